r"""Has the trunk write a short text persona for each class from a sample of its lines.

  python launch/summarize_personas.py --records=data/cornell/records.jsonl --model_dir=/path/to/Meta-Llama-3-8B

Generation is batched and cached in OUTPUT_DIR/personas.json (a rerun only
writes the missing ones), then the `persona` field of every record is
filled and records.jsonl is rewritten atomically (or written to --output).
The paper used Llama-3-8B for this.
"""

import json
import os

if __package__:  # imported as launch.summarize_personas: installed, python -m, or a console entry point
  from launch import common  # noqa: F401
else:  # python launch/summarize_personas.py from a checkout (sys.path[0] is launch/)
  import common  # noqa: F401
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("records", None, "records.jsonl from launch/prepare_data.py.", required=True)
flags.DEFINE_string("model_dir", None, "Local Hugging Face checkpoint of the summarizing trunk.", required=True)
flags.DEFINE_string("output", None, "Where to write the records with personas (default: in place).")
flags.DEFINE_string("dtype", "float32", "Trunk dtype (bfloat16 on accelerators).")
flags.DEFINE_integer("lines_per_class", 8, "Lines sampled per class for its summary.")
flags.DEFINE_integer("batch_size", 8, "Classes summarized per generation batch.")
flags.DEFINE_integer("max_new_tokens", 60, "Length limit of a persona.")
flags.DEFINE_integer("max_prompt_tokens", 768, "Prompt budget; sampled lines are dropped to fit.")
flags.DEFINE_integer("seed", 0, "Seed for sampling lines.")

PROMPT = ("Here are some lines written or spoken by one person:\n{lines}\n\n"
          "Describe this person's personality and way of speaking in one or two sentences, "
          "in the second person (\"You are ...\").\nDescription: You are")


def build_prompt(tokenizer, lines: list[str], budget: int) -> str:
  """The summary prompt, dropping sampled lines from the end until it fits `budget` tokens."""
  lines = list(lines)
  while True:
    text = PROMPT.format(lines="\n".join(f"- {l}" for l in lines))
    if len(tokenizer(text)["input_ids"]) <= budget or len(lines) <= 1:
      return text
    lines.pop()


def main(argv):
  del argv
  import numpy as np
  from tqdm.auto import tqdm

  import persomux
  from persomux import data as data_lib

  mesh = common.setup()
  records, _ = data_lib.load_records(FLAGS.records)
  out_path = FLAGS.output or FLAGS.records
  cache_path = os.path.join(os.path.dirname(os.path.abspath(out_path)), "personas.json")
  cache = json.load(open(cache_path)) if os.path.isfile(cache_path) else {}
  groups = data_lib.by_class(records)
  todo = sorted(c for c in groups if c not in cache)
  model, tokenizer = persomux.load_model(FLAGS.model_dir, dtype=FLAGS.dtype, mesh=mesh)
  rng = np.random.default_rng(FLAGS.seed)
  for start in tqdm(range(0, len(todo), FLAGS.batch_size), desc="personas"):
    chunk = todo[start:start + FLAGS.batch_size]
    prompts = []
    for cls in chunk:
      rs = groups[cls]
      pick = sorted(rng.permutation(len(rs))[:FLAGS.lines_per_class])
      prompts.append(build_prompt(tokenizer, [rs[i].text.replace("\n", " ") for i in pick],
                                  FLAGS.max_prompt_tokens))
    texts = persomux.generate(model, tokenizer, prompts, max_new_tokens=FLAGS.max_new_tokens, stop=["\n"])
    for cls, text in zip(chunk, texts):
      cache[cls] = "You are" + text.rstrip()
    with open(cache_path + ".tmp", "w") as f:  # the cache survives an interruption
      json.dump(cache, f, indent=1)
    os.replace(cache_path + ".tmp", cache_path)
  data_lib.write_jsonl([{**r.to_json(), "persona": cache[r.cls]} for r in records], out_path)
  print(f"wrote {len(records)} records with personas for {len(groups)} classes to {out_path}")


def run():
  """Console entry point."""
  common.run(main)


if __name__ == "__main__":
  run()
