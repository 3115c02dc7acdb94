"""The paper's setup: Llama-3-8B, n=64 codes of k=8 tokens, l=12 bias tokens,
90/10 class split, stage 2 full batch for 100 steps, Adam eps 1e-4. The full batch
runs as micro-batches of stage 1's 32 rows (the update is the same, memory bounded).

  python launch/pretrain.py --config=configs/llama3_8b_paper.py \
      --config.model_dir=/path/to/Meta-Llama-3-8B --config.data.path=records.jsonl --workdir=runs/l3
"""

from configs import base


def get_config():
  c = base.get_config()
  c.dtype = "bfloat16"
  c.remat = True
  c.data.max_len = 512
  c.pretrain.batch_size = 32
  c.pretrain.learning_rate = 1e-3
  c.pretrain.epochs = 1
  c.finetune.steps = 100
  c.finetune.micro_batch_size = 32
  c.finetune.learning_rate = 1e-2
  return c
