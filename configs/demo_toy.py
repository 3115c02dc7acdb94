"""The toy demo: a small Llama-architecture base model trained from scratch on the
toy-vocabulary synthetic population (persomux.synthetic), ~200 pretraining
personas and 20 unseen ones. Runs in minutes on 2 CPU cores; for tests and
quick checks (`launch/demo.py --config=configs/demo_toy.py`)."""

import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.corpus_kind = "synthetic"  # persomux.synthetic (toy vocabulary)
  c.prompt.init_std = 0.02  # as when the toy demo's figures were measured
  c.corpus = ml_collections.ConfigDict()
  c.corpus.num_personas = 220
  c.corpus.examples_per_persona = 40
  c.corpus.seed = 0
  c.corpus.style_strength = 0.8

  c.base_model = ml_collections.ConfigDict()
  c.base_model.vocab_size = 512
  c.base_model.d_model = 96
  c.base_model.num_layers = 4
  c.base_model.num_heads = 4
  c.base_model.num_kv_heads = 2
  c.base_model.ffn_dim = 256
  c.base_model.steps = 800
  c.base_model.batch_size = 32
  c.base_model.learning_rate = 3e-3

  c.data.finetune_fraction = 20 / 220  # 20 unseen personas
  c.data.test_fraction = 1 / 3
  c.data.max_per_class_finetune = 30  # 20 train + 10 test per unseen persona
  c.data.max_len = 64
  c.data.use_chat_template = "no"

  c.pretrain.batch_size = 32
  c.pretrain.warmup_epochs = 1
  c.pretrain.epochs = 3
  c.pretrain.learning_rate = 1e-2
  c.pretrain.checkpoint_every = 100
  c.pretrain.eval_every = 100

  c.finetune.steps = 100
  # The paper trains stage 2 full batch; 100-example minibatches keep the
  # demo within minutes on 2 CPU cores (set 0 for full batch).
  c.finetune.batch_size = 100
  c.finetune.learning_rate = 3e-2
  c.finetune.checkpoint_every = 50
  c.finetune.eval_every = 50

  # LoRA baseline: one epoch over the pretraining + unseen personas' train splits.
  c.lora.batch_size = 32
  c.lora.epochs = 1
  c.lora.learning_rate = 3e-3
  c.lora.checkpoint_every = 100
  c.lora.eval_every = 100

  # A reduced evaluation: 8 of the 20 unseen personas, 2 prompts each, short generations.
  c.eval.generation_classes = 8
  c.eval.prompts_per_class = 2
  c.eval.max_new_tokens = 24
  c.eval.discrimination_trials = 16
  c.eval.batch_size = 16
  return c
