"""The README's demo: Persona-Mux on the real SmolLM2-135M-Instruct (the shipped
GGUF), personalized to a population of English-speaking personas with hidden
styles (persomux.personas_en). Stage 1 on the pretraining personas, stage 2 on
unseen ones, then a reduced paper evaluation, sized for 2 CPU cores (the README
gives the measured times). Every figure it prints is reproducible run to run on
one machine."""

import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.model_dir = "smollm2-135m-instruct"  # a shipped model name, a .gguf file or a Hugging Face directory
  c.dtype = "float32"  # bf16 matmuls are slower than fp32 on CPUs

  c.corpus_kind = "personas_en"  # persomux.personas_en: natural English replies
  c.corpus = ml_collections.ConfigDict()
  c.corpus.num_personas = 38
  c.corpus.examples_per_persona = 12
  c.corpus.seed = 0
  c.corpus.style_strength = 0.85
  c.corpus.max_words = 32

  c.data.finetune_fraction = 6 / 38  # 6 unseen personas
  c.data.test_fraction = 1 / 3  # 8 train + 4 test examples per persona
  c.data.max_len = 96
  c.data.use_chat_template = "yes"  # system: persona + soft tokens; user: context; assistant: reply

  c.prompt.init_std = 0.0  # the trunk's own embedding scale

  # 8-example batches in both stages: half the arithmetic of 16-example ones at the same number
  # of steps. On the slower 2-core machine of 2026-12-01/02 (README, "The demo, and what it
  # shows"), unseen personas' test loss with 16 / 8: Persona-Mux 3.333 / 3.470, random codebook
  # 3.454 / 3.525, soft prompt 3.405 / 3.661, and training took about 43 / 29 minutes.
  c.pretrain.batch_size = 8
  c.pretrain.warmup_epochs = 1
  # Stage-1 length and the mixtures' step are what the codebook needs (README, "Why Persona-Mux
  # lagged"): unseen personas' Persona-Mux loss 3.720 with 2 joint epochs, 3.521 with 6, and
  # 3.328 with 6 when the mixtures take 10x the step of W and b (m must travel to O(1) while
  # W and b are already at the trunk's embedding scale); all at 16-example batches. At 8, one
  # epoch is 32 steps: 32 bias-only steps, then 96 joint ones.
  c.pretrain.epochs = 3
  c.pretrain.learning_rate = 1e-2
  c.pretrain.mixture_lr_scale = 10.0
  c.pretrain.checkpoint_every = 32
  c.pretrain.eval_every = 1000

  # Stage 2: 24 steps of 8 examples (4 epochs), one rate for every method: 1e-1, Persona-Mux's best.
  # Swept for all at 1e-1 / 3e-1 / 1 (README) on the 2-core machine of 2026-12-02 (morning):
  # Persona-Mux 3.412 / 3.432 / 3.493, random codebook 3.430 / 3.451 / 3.495, soft prompt
  # 3.648 / 3.664 / 3.584; on the slower one of the night before, Persona-Mux 3.470 / 3.528 /
  # 3.550, soft prompt 3.661 / 3.655 / 3.592.
  c.finetune.batch_size = 8
  c.finetune.steps = 24
  c.finetune.learning_rate = 1e-1
  c.finetune.checkpoint_every = 12
  c.finetune.eval_every = 1000

  c.eval.methods = "base,icl,soft_prompt,random_codebook,persona_mux"
  c.eval.generation_classes = 6
  c.eval.prompts_per_class = 2
  c.eval.max_new_tokens = 40
  c.eval.discrimination_trials = 12
  c.eval.batch_size = 12
  c.eval.judge_max_len = 256
  return c
