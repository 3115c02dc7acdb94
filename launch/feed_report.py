r"""What the feed's readers said, per method: like rates, mark-as-AI rates, counts and a plot.

  python launch/feed_report.py --workdir=runs/demo

Reads WORKDIR/feed.sqlite (the server may keep running: the file is in WAL
mode) and prints, per method (real posts, then each generation method, then all
generated posts together): posts, times shown, up / down / ai reactions, the
like rate up / (up + down) and the marked-as-AI rate ai / all reactions (on real
posts: the false-alarm rate), each with a 95% Wilson interval. Writes
WORKDIR/feed_results.json and the plot WORKDIR/feed_results.png (--out= elsewhere).
"""

import json
import os

if __package__:  # imported as launch.feed_report: installed, python -m, or a console entry point
  from launch import common  # noqa: F401
else:  # python launch/feed_report.py from a checkout (sys.path[0] is launch/)
  import common  # noqa: F401
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A run whose server collected reactions (WORKDIR/feed.sqlite).", required=True)
flags.DEFINE_string("out", None, "Where the plot goes (default WORKDIR/feed_results.png; the JSON beside it).")


def main(argv):
  del argv
  from persomux.feed import results
  from persomux.feed.store import Store, StoreError

  try:
    store = Store.of_run(FLAGS.workdir)
  except StoreError as e:
    raise app.UsageError(str(e)) from e
  summary = results.summarize(store.method_counts(), readers=len(store.readers()))
  print(results.to_text(summary))
  plot = FLAGS.out or os.path.join(FLAGS.workdir, "feed_results.png")
  os.makedirs(os.path.dirname(os.path.abspath(plot)), exist_ok=True)
  results.plot(summary, plot)
  out_json = os.path.splitext(plot)[0] + ".json"
  with open(out_json, "w") as f:
    json.dump(summary, f, indent=1)
  print(f"wrote {plot} and {out_json}")


def run():
  """Console entry point."""
  common.run(main)


if __name__ == "__main__":
  run()
