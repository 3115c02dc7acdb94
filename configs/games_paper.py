"""Amazon Video Games as in the paper: 100 user clusters from SASRec
embeddings, 100 training examples per held-out cluster.

  python launch/prepare_data.py --dataset=games --input=Video_Games.jsonl --meta=meta_Video_Games.jsonl \
      --output=data/games --num_classes=100
  python launch/pretrain.py --config=configs/games_paper.py --workdir=runs/games \
      --config.model_dir=/path/to/Meta-Llama-3-8B
"""

from configs import llama3_8b_paper


def get_config():
  c = llama3_8b_paper.get_config()
  c.data.path = "data/games/records.jsonl"
  c.data.finetune_fraction = 0.1
  c.data.test_fraction = 0.1
  c.data.max_per_class_finetune = 112
  c.eval.generation_classes = 8  # the paper generates for 8 game clusters
  c.eval.discrimination = "next"  # the judge picks the next game among the generated one and 3 decoys
  return c
