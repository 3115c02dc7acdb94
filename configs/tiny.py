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
  return c
