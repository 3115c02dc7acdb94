"""Celebrity tweets as in the paper (896 authors in Table 1): 100 tweets per
author for pretraining, 100 training tweets per held-out author.

  python launch/prepare_data.py --dataset=tweets --input=tweets.csv --output=data/tweets --max_per_class=112
  python launch/summarize_personas.py --records=data/tweets/records.jsonl --model_dir=/path/to/Meta-Llama-3-8B
  python launch/pretrain.py --config=configs/tweets_paper.py --workdir=runs/tweets \
      --config.model_dir=/path/to/Meta-Llama-3-8B
"""

from configs import llama3_8b_paper


def get_config():
  c = llama3_8b_paper.get_config()
  c.data.path = "data/tweets/records.jsonl"
  c.data.finetune_fraction = 0.1
  c.data.test_fraction = 0.1
  # Caps apply before the per-class train/test split: 112 -> ~100 train + ~11 test.
  c.data.max_per_class_pretrain = 112
  c.data.max_per_class_finetune = 112
  return c
