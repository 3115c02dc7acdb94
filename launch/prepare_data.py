r"""Turns a corpus in its original format into class-labelled records.

  python launch/prepare_data.py --dataset=cornell --input=cornell_movie_dialogs_corpus/ --output=data/cornell
  python launch/prepare_data.py --dataset=tweets --input=tweets.csv --author_column=author \
      --text_column=content --output=data/tweets
  python launch/prepare_data.py --dataset=games --input=Video_Games.jsonl --meta=meta_Video_Games.jsonl \
      --output=data/games

Writes OUTPUT/records.jsonl (`class`, `text`, `context`, `group`, `persona`)
and OUTPUT/stats.json (`{"classes", "records", "skipped": {reason: count}}`),
and prints the stats and how long it took.
Download the corpora yourself; nothing is fetched.
"""

import collections
import json
import os
import time

if __package__:  # imported as launch.prepare_data: installed, python -m, or a console entry point
  from launch import common  # noqa: F401
else:  # python launch/prepare_data.py from a checkout (sys.path[0] is launch/)
  import common  # noqa: F401
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", None, ["cornell", "tweets", "games"], "Which corpus --input holds.", required=True)
flags.DEFINE_string("input", None, "Cornell: the corpus directory; tweets: the CSV; games: the interactions "
                    "(Amazon Reviews 2023 JSONL or 'user item' lines).", required=True)
flags.DEFINE_string("output", None, "Directory for records.jsonl and stats.json.", required=True)
flags.DEFINE_integer("min_conversations", 5, "cornell: drop characters in fewer conversations.")
flags.DEFINE_integer("max_context_lines", 4, "cornell: previous lines of the conversation kept as context.")
flags.DEFINE_string("author_column", "name", "tweets: the author column.")
flags.DEFINE_string("text_column", "text", "tweets: the tweet text column.")
flags.DEFINE_integer("max_per_class", 100, "tweets: at most this many tweets per author (paper: 100).")
flags.DEFINE_string("meta", None, "games: Amazon 2023 item metadata JSONL, for game titles.")
flags.DEFINE_integer("num_classes", 100, "games: user clusters (paper: 100).")
flags.DEFINE_integer("max_history", 10, "games: previous games kept as context.")
flags.DEFINE_integer("sasrec_steps", 2000, "games: SASRec training steps, batches of about 128 users "
                     "(2000: about 7 epochs of SASRec's Video Games file).")
flags.DEFINE_integer("seed", 0, "Seed for sampling, SASRec and k-means.")


def main(argv):
  del argv
  start = time.perf_counter()
  from persomux import data as data_lib

  if FLAGS.dataset == "cornell":
    from persomux.corpora import cornell

    records, skipped = cornell.read_cornell(FLAGS.input, min_conversations=FLAGS.min_conversations,
                                            max_context_lines=FLAGS.max_context_lines)
  elif FLAGS.dataset == "tweets":
    from persomux.corpora import tweets

    records, skipped = tweets.read_tweets(FLAGS.input, author_column=FLAGS.author_column,
                                          text_column=FLAGS.text_column, max_per_class=FLAGS.max_per_class,
                                          seed=FLAGS.seed)
  else:
    from persomux.corpora import games

    records, skipped = games.read_games(FLAGS.input, meta_path=FLAGS.meta, num_classes=FLAGS.num_classes,
                                        max_history=FLAGS.max_history, sasrec_steps=FLAGS.sasrec_steps,
                                        seed=FLAGS.seed)
  if not records:
    raise app.UsageError(f"{FLAGS.input}: no records survived (skipped: {dict(skipped)})")
  os.makedirs(FLAGS.output, exist_ok=True)
  data_lib.write_jsonl(records, os.path.join(FLAGS.output, "records.jsonl"))
  stats = {"classes": len({r.cls for r in records}), "records": len(records),
           "skipped": dict(collections.Counter(skipped))}
  with open(os.path.join(FLAGS.output, "stats.json"), "w") as f:
    json.dump(stats, f, indent=2)
  print(json.dumps(stats, indent=2))
  print(f"prepared {len(records)} records of {stats['classes']} classes in {time.perf_counter() - start:.1f} s")


def run():
  """Console entry point."""
  common.run(main)


if __name__ == "__main__":
  run()
