"""Defaults shared by every persomux run; other configs start from these."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model_dir = ""  # the frozen trunk: a Hugging Face directory, a .gguf file or a shipped model name
  # Trunk dtype, e.g. bfloat16 on accelerators; "" = the checkpoint's own (float32 for GGUF).
  # Prompt parameters are always float32.
  c.dtype = ""
  # Rematerialization of the decoder layers in the backward pass (activation memory for compute): a
  # policy name, "none", "full" (recompute each layer; True) or "save_qkv_mlp" (keep the projections'
  # outputs, recompute the rest), or a bool (modeling.REMAT_POLICIES).
  c.remat = False
  c.seed = 0
  c.mesh = ""  # e.g. "data:2,fsdp:2,tensor:2"; empty: every device on `data`
  # Target tokens whose logits are computed at once (the loss never holds [batch, seq, vocab]
  # logits: only target positions, a chunk at a time; one chunk is [loss_chunk, vocab] float32).
  c.loss_chunk = 1024

  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # JSONL, CSV or Parquet with class/text[/context/persona/group]
  c.data.finetune_fraction = 0.1  # share of the data whose classes are held out for stage 2
  c.data.test_fraction = 0.1  # per-class test split
  c.data.max_per_class_pretrain = 0  # 0: no cap (paper: 100 on tweets)
  c.data.max_per_class_finetune = 0  # 0: no cap (paper: 100 on tweets and games)
  c.data.max_len = 256  # token budget per example, soft tokens excluded; context is cut from the left
  c.data.template = "{persona}{soft}\n{context}\n"
  c.data.use_chat_template = "auto"  # auto | yes | no

  c.prompt = ml_collections.ConfigDict()
  c.prompt.num_codes = 64  # n
  c.prompt.code_tokens = 8  # k
  c.prompt.bias_tokens = 12  # l
  c.prompt.soft_prompt_tokens = 8  # SoftPrompt baseline length
  # Scale of the random init of W, b and soft prompts; 0 = the trunk's own embedding scale
  # (stages.embedding_std). Much smaller soft tokens learn slowly: with m = 0, W gets no gradient
  # and m a gradient proportional to W.
  c.prompt.init_std = 0.0

  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.batch_size = 8  # examples per update
  # Rows per forward pass: an update sums the gradients of batch_size / micro_batch_size micro-batches
  # (the same update as one big batch, in bounded memory); 0: the whole batch in one pass.
  c.pretrain.micro_batch_size = 0
  c.pretrain.warmup_epochs = 1  # bias-only epochs before joint training
  c.pretrain.epochs = 1  # joint epochs
  c.pretrain.learning_rate = 1e-3
  c.pretrain.schedule = "constant"
  c.pretrain.warmup_steps = 0
  c.pretrain.clip_norm = 1.0
  c.pretrain.adam_eps = 1e-4
  c.pretrain.mixture_lr_scale = 1.0  # the mixtures' step relative to W and b (the demo: 10)
  c.pretrain.checkpoint_every = 200
  c.pretrain.eval_every = 200

  c.finetune = ml_collections.ConfigDict()
  c.finetune.batch_size = 0  # 0: full batch (all of the new classes' data), as in the paper
  c.finetune.micro_batch_size = 0  # rows per forward pass (see pretrain); set it for a large full batch
  c.finetune.steps = 100
  c.finetune.learning_rate = 1e-2
  c.finetune.schedule = "constant"
  c.finetune.warmup_steps = 0
  c.finetune.clip_norm = 1.0
  c.finetune.adam_eps = 1e-4
  c.finetune.checkpoint_every = 50
  c.finetune.eval_every = 25

  # LoRA baseline: the pretraining classes' train split plus the finetuning classes' train split.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.targets = "q_proj,v_proj"  # any of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
  c.lora.batch_size = 8
  c.lora.micro_batch_size = 0
  c.lora.epochs = 1
  c.lora.steps = 0  # > 0 overrides epochs
  c.lora.learning_rate = 1e-4
  c.lora.schedule = "constant"
  c.lora.warmup_steps = 0
  c.lora.clip_norm = 1.0
  c.lora.adam_eps = 1e-4
  c.lora.checkpoint_every = 200
  c.lora.eval_every = 200

  # launch/evaluate.py: the paper's evaluation on the held-out (stage-2) classes.
  c.eval = ml_collections.ConfigDict()
  c.eval.methods = "base,icl,lora,soft_prompt,random_codebook,persona_mux"
  c.eval.bias_scales = "1.0,0.5,0.0"  # Persona-Mux bias sweep: full, half, none
  c.eval.icl_shots = 3  # in-context examples of the class in the ICL prompt
  c.eval.generation_classes = 32  # paper: 32 classes (8 on games)
  c.eval.prompts_per_class = 2  # test-set contexts per class used as generation prompts
  c.eval.max_new_tokens = 64
  c.eval.temperature = 1.0  # paper: temperature 1.0, top-k 50
  c.eval.top_k = 50
  c.eval.batch_size = 16  # generation and judge batch size
  c.eval.discrimination = "fake"  # fake: spot the generated text among 3 real ones; next: pick the next item
  c.eval.discrimination_trials = 50  # paper: out of 50
  c.eval.judge_max_len = 512
  c.eval.seed = 0
  return c
