"""launch/prepare_data.py and launch/summarize_personas.py end to end."""

import json

from tests.test_corpora_games import _two_populations
from tests.test_launch import run, setup  # noqa: F401  (fixture)


def test_prepare_games(tmp_path):
  seqs = tmp_path / "seq.txt"
  _two_populations(seqs)
  out = tmp_path / "games"
  run("prepare_data.py", "--dataset=games", f"--input={seqs}", f"--output={out}", "--num_classes=2",
      "--sasrec_steps=50")
  stats = json.load(open(out / "stats.json"))
  records = [json.loads(l) for l in open(out / "records.jsonl")]
  assert stats["records"] == len(records) and stats["classes"] == 2
  assert stats["skipped"] == {"malformed line": 1, "user with one interaction": 1}
  assert set(records[0]) == {"class", "text", "context", "group", "persona"}
  bad = run("prepare_data.py", "--dataset=games", f"--input={tmp_path / 'missing.txt'}", f"--output={out}",
            check=False)
  assert bad.returncode != 0 and "missing.txt: no such file" in bad.stderr


def test_summarize_personas_fills_and_caches(setup, tmp_path):  # noqa: F811
  _, model_dir, data, records = setup
  out = tmp_path / "with_personas.jsonl"
  args = [f"--records={data}", f"--model_dir={model_dir}", f"--output={out}", "--max_new_tokens=6",
          "--lines_per_class=3", "--batch_size=4"]
  run("summarize_personas.py", *args)
  rows = [json.loads(l) for l in open(out)]
  assert len(rows) == len(records)
  personas = {r["class"]: r["persona"] for r in rows}
  assert all(p.startswith("You are") for p in personas.values())
  assert all(r["persona"] == personas[r["class"]] for r in rows)  # one persona per class
  cache = json.load(open(tmp_path / "personas.json"))
  assert cache == personas
  run("summarize_personas.py", *args)  # a rerun reuses the cache
  assert [json.loads(l) for l in open(out)] == rows


def test_prepare_cornell_and_tweets(tmp_path):
  from tests.test_corpora_text import _cornell

  corpus = tmp_path / "cornell"
  corpus.mkdir()
  _cornell(corpus)
  out = tmp_path / "cornell_out"
  run("prepare_data.py", "--dataset=cornell", f"--input={corpus}", f"--output={out}", "--min_conversations=1")
  stats = json.load(open(out / "stats.json"))
  records = [json.loads(l) for l in open(out / "records.jsonl")]
  assert stats["records"] == len(records) > 0 and stats["skipped"]["malformed line"] >= 1
  assert all(r["group"] for r in records)

  csv_path = tmp_path / "tweets.csv"
  csv_path.write_text("author,content\nsailor_sam,RT @bob: The harbor at sunset is calm http://x.co/1\n"
                      "sailor_sam,Boats boats boats and more boats today\nbaker_bea,Fresh bread rolls every morning\n")
  out = tmp_path / "tweets_out"
  run("prepare_data.py", "--dataset=tweets", f"--input={csv_path}", f"--output={out}", "--author_column=author",
      "--text_column=content")
  records = [json.loads(l) for l in open(out / "records.jsonl")]
  assert records[0]["text"] == "The harbor at sunset is calm"
  assert records[0]["context"].startswith("Write a tweet about: ")
  assert json.load(open(out / "stats.json"))["classes"] == 2
