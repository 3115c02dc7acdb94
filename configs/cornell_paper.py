"""Cornell Movie-Dialogs as in the paper (7,597 characters, 256K lines in Table 1).

  python launch/prepare_data.py --dataset=cornell --input=cornell_movie_dialogs_corpus --output=data/cornell
  python launch/summarize_personas.py --records=data/cornell/records.jsonl --model_dir=/path/to/Meta-Llama-3-8B
  python launch/pretrain.py --config=configs/cornell_paper.py --workdir=runs/cornell \
      --config.model_dir=/path/to/Meta-Llama-3-8B

Characters of one movie share a group, so they stay on one side of the 90/10
split; stage 2 uses whatever data each held-out character has.
"""

from configs import llama3_8b_paper


def get_config():
  c = llama3_8b_paper.get_config()
  c.data.path = "data/cornell/records.jsonl"
  c.data.finetune_fraction = 0.1
  c.data.max_per_class_finetune = 0  # all available lines
  return c
