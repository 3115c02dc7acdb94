r"""Each feed reader's reactions as Drift pairs and add_personas records.

  python launch/feed_export.py --workdir=runs/demo --out=runs/demo/feed_export

Writes OUT/pairs.jsonl (per reader and context, every upvoted post against every
downvoted one: prompt, chosen, rejected, user) and OUT/records.jsonl (every post
a reader upvoted as a record of class READER), then prints what to run next:

  python launch/drift.py fit --pairs=OUT/pairs.jsonl --model=MODEL --out=WORKDIR/drift
      (several readers: WORKDIR/drift/READER.json each; the server steers a reader's
      feed posts, and any chat request with "drift": READER, by them when started
      with --drift_streams; with one reader, --out=WORKDIR/drift/READER.json)
  python launch/add_personas.py --workdir=WORKDIR --data=OUT/records.jsonl --job=feed_DATE
      (each reader becomes a persona, named after them; a later export goes in a new
      job, with --replace to retrain readers who are personas already)

"Mark as AI" reactions enter neither file.
"""

import json
import os
import time

if __package__:  # imported as launch.feed_export: installed, python -m, or a console entry point
  from launch import common  # noqa: F401
else:  # python launch/feed_export.py from a checkout (sys.path[0] is launch/)
  import common  # noqa: F401
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A run whose server collected reactions (WORKDIR/feed.sqlite).", required=True)
flags.DEFINE_string("out", None, "Output directory for pairs.jsonl and records.jsonl.", required=True)


def main(argv):
  del argv
  from persomux.feed import export
  from persomux.feed.store import Store, StoreError

  try:
    out = export.write(Store.of_run(FLAGS.workdir), FLAGS.out)
  except StoreError as e:
    raise app.UsageError(str(e)) from e
  for reader, n in out["readers"].items():
    print(f"{reader}: {n['pairs']} pairs, {n['liked']} liked posts")
  print(f"wrote {out['pairs']} pairs to {out['pairs_path']} and {out['records']} records to {out['records_path']}")
  with open(os.path.join(FLAGS.workdir, "run.json")) as f:  # read as is: no JAX needed to export
    model = json.load(f).get("model_dir") or "MODEL"
  with_pairs = [r for r, n in out["readers"].items() if n["pairs"]]
  if with_pairs:
    target = os.path.join(FLAGS.workdir, "drift") + ("" if len(with_pairs) > 1 else f"/{with_pairs[0]}.json")
    print(f"next: python launch/drift.py fit --pairs={out['pairs_path']} --model={model} --out={target}")
  if out["records"]:
    print(f"next: python launch/add_personas.py --workdir={FLAGS.workdir} --data={out['records_path']} "
          f"--job=feed_{time.strftime('%Y%m%d_%H%M%S')}  (add --replace if these readers are personas already)")


def run():
  """Console entry point."""
  common.run(main)


if __name__ == "__main__":
  run()
