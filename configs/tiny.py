"""What the tests use: a tiny codebook and short runs (pair with a tiny trunk)."""

from configs import base


def get_config():
  c = base.get_config()
  c.data.max_len = 64
  c.prompt.num_codes = 8
  c.prompt.code_tokens = 2
  c.prompt.bias_tokens = 3
  c.prompt.soft_prompt_tokens = 2
  c.pretrain.batch_size = 4
  c.pretrain.learning_rate = 1e-2
  c.pretrain.checkpoint_every = 2
  c.pretrain.eval_every = 4
  c.finetune.steps = 6
  c.finetune.checkpoint_every = 2
  c.finetune.eval_every = 3
  c.lora.rank = 2
  c.lora.batch_size = 4
  c.lora.steps = 6
  c.lora.learning_rate = 1e-2
  c.lora.checkpoint_every = 2
  c.lora.eval_every = 3
  c.eval.generation_classes = 2
  c.eval.prompts_per_class = 2
  c.eval.max_new_tokens = 6
  c.eval.batch_size = 4
  c.eval.discrimination_trials = 4
  c.eval.judge_max_len = 128
  return c
