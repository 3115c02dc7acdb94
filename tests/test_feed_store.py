"""The feed's store, results and export on their own (no model, no server): the
SQLite schema and its migration, reactions counted once per (reader, post), how
feeds are drawn, Wilson intervals against published values, and the pairs and
records a feed exports."""

import json
import os
import sqlite3
import subprocess
import sys
import threading

import pytest

from persomux import data as data_lib
from persomux import drift
from persomux.feed import export, results
from persomux.feed.store import REAL, SCHEMA_VERSION, Store, StoreError, UnknownPost, group_odds
from tests.test_launch import cached_env

GEN = ("base", "soft_prompt", "persona_mux")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pool(store: Store, contexts: int, methods=GEN, reader_only: dict | None = None) -> None:
  rows = []
  for i in range(contexts):
    ctx = f"question {i}?"
    rows.append({"key": f"real|{i}", "context_key": f"c{i}", "context": ctx, "text": f"real reply {i}",
                 "method": REAL, "persona": f"p{i % 3}"})
    rows += [{"key": f"{m}|{i}", "context_key": f"c{i}", "context": ctx, "text": f"{m} reply {i}", "method": m,
              "persona": f"p{i % 3}"} for m in methods]
    for reader, method in (reader_only or {}).items():
      rows.append({"key": f"{method}|{i}|{reader}", "context_key": f"c{i}", "context": ctx,
                   "text": f"{method} for {reader} {i}", "method": method, "persona": f"p{i % 3}", "reader": reader})
  store.add_posts(rows)


def _methods(store: Store, ids) -> list[str]:
  return [store.post(i)["method"] for i in ids]


def test_a_new_file_is_migrated_in_wal_mode_and_reopens(tmp_path):
  path = str(tmp_path / "run" / "feed.sqlite")
  s = Store(path)
  assert s.version() == SCHEMA_VERSION
  conn = sqlite3.connect(path)
  assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
  tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
  assert {"schema_version", "posts", "readers", "feed", "reactions"} <= tables
  _pool(s, 2)
  s.react("ann", s.feed("ann", 1)[0]["id"], "up")
  s.close()
  again = Store(path)  # a second open migrates nothing and keeps everything
  assert again.version() == SCHEMA_VERSION and len(again.keys()) == 8 and len(again.reactions()) == 1
  assert conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 1


def test_an_older_schema_is_migrated_and_a_newer_or_foreign_file_refused(tmp_path):
  old = str(tmp_path / "old.sqlite")
  conn = sqlite3.connect(old)
  conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
  conn.execute("INSERT INTO schema_version VALUES (0)")
  conn.commit()
  assert Store(old).version() == SCHEMA_VERSION

  newer = str(tmp_path / "newer.sqlite")
  Store(newer)
  conn = sqlite3.connect(newer)
  conn.execute("UPDATE schema_version SET version = 99")
  conn.commit()
  with pytest.raises(StoreError, match=r"newer.sqlite.*version 99"):
    Store(newer)

  junk = tmp_path / "junk.sqlite"
  junk.write_bytes(b"this is not a database at all" * 100)
  with pytest.raises(StoreError, match="junk.sqlite"):
    Store(str(junk))


def test_each_reader_and_post_counts_once_and_votes_change(tmp_path):
  s = Store(str(tmp_path / "f.sqlite"))
  _pool(s, 4)
  ids = [p["id"] for p in s.feed("ann", 6)]
  s.add_posts([{"key": "drift|ann", "context_key": "c0", "context": "question 0?", "text": "for ann",
                "method": "drift", "reader": "ann"}])
  s.react("ann", ids[0], "up")
  s.react("ann", ids[0], "up")
  s.react("ann", ids[1], "up")
  s.react("ann", ids[1], "down")  # changed: counts as down only
  s.react("ann", ids[2], "ai")
  s.react("ann", ids[2], None)  # taken back
  s.react("bob", ids[0], "down")
  counts = s.method_counts()
  assert sum(c["up"] for c in counts.values()) == 1
  assert sum(c["down"] for c in counts.values()) == 2
  assert sum(c["ai"] for c in counts.values()) == 0
  assert [p["reaction"] for p in s.feed("ann", 3)] == ["up", "down", None]
  with pytest.raises(UnknownPost):
    s.react("ann", "no-such-post", "up")
  with pytest.raises(ValueError, match="reaction 'meh'"):
    s.react("ann", ids[0], "meh")
  drift_post = sqlite3.connect(s.path).execute("SELECT id FROM posts WHERE reader = 'ann'").fetchone()[0]
  with pytest.raises(UnknownPost):  # another reader's Drift post is not bob's to see
    s.react("bob", drift_post, "up")


def test_group_odds_give_the_share_in_expectation():
  for share in (0.1, 0.25, 0.5, 0.75, 0.9):
    for real, gen in ((1, 1), (1, 3), (1, 4), (3, 9), (2, 1)):
      p_real, p_gen = group_odds(share, real, gen)
      assert 0 <= p_real <= 1 and 0 <= p_gen <= 1
      assert abs(p_gen * gen / (p_real * real + p_gen * gen) - share) < 1e-12, (share, real, gen)
  assert group_odds(0.0, 1, 3) == (1.0, 0.0) and group_odds(1.0, 1, 3) == (0.0, 1.0)
  assert group_odds(0.5, 0, 3) == (0.0, 1.0) and group_odds(0.5, 2, 0) == (1.0, 0.0)


def test_feeds_keep_the_share_group_contexts_and_are_the_same_however_paged(tmp_path):
  s = Store(str(tmp_path / "f.sqlite"))
  _pool(s, 150, reader_only={"ann": "drift"})
  whole = s.feed("ann", 120)
  assert len({p["id"] for p in whole}) == 120
  paged = [p for k in range(0, 120, 7) for p in s.feed("ann", 7, offset=k)][:120]
  assert [p["id"] for p in paged] == [p["id"] for p in whole]
  methods = _methods(s, [p["id"] for p in whole])
  share = sum(m != REAL for m in methods) / len(methods)
  assert 0.4 < share < 0.6, share
  assert {"base", "soft_prompt", "persona_mux", "drift"} <= set(methods)
  # One context's posts come together, and real posts open a context as often as generated ones.
  contexts = [p["context"] for p in whole]
  runs = [contexts[0]] + [c for a, c in zip(contexts, contexts[1:]) if c != a]
  assert len(runs) == len(set(runs))
  first = [methods[i] for i in range(len(whole)) if i == 0 or contexts[i] != contexts[i - 1]]
  real_first = sum(m == REAL for m in first) / len(first)
  size = len(whole) / len(runs)
  assert abs(real_first - 1 / size) < 0.2, (real_first, size)
  # Another reader never sees ann's Drift posts, and gets a feed of their own.
  bob = s.feed("bob", 120)
  assert "drift" not in _methods(s, [p["id"] for p in bob])
  assert [p["id"] for p in bob] != [p["id"] for p in whole]
  # The extremes.
  assert set(_methods(s, [p["id"] for p in s.feed("cy", 40, share=0.0)])) == {REAL}
  assert REAL not in _methods(s, [p["id"] for p in s.feed("di", 40, share=1.0)])


def test_a_context_several_classes_answer_keeps_the_share(tmp_path):
  s = Store(str(tmp_path / "f.sqlite"))
  rows = []
  for i in range(100):  # three classes' real replies to one question, and each method's post for each
    for cls in ("a", "b", "c"):
      rows.append({"key": f"real|{cls}|{i}", "context_key": f"c{i}", "context": f"q{i}", "text": f"{cls} {i}",
                   "method": REAL, "persona": cls})
      rows += [{"key": f"{m}|{cls}|{i}", "context_key": f"c{i}", "context": f"q{i}", "text": f"{m} {cls} {i}",
                "method": m, "persona": cls} for m in GEN]
  s.add_posts(rows)
  methods = _methods(s, [p["id"] for p in s.feed("ann", 200, share=0.5)])
  assert 0.4 < sum(m != REAL for m in methods) / len(methods) < 0.6


def test_a_feed_grows_only_from_what_it_may_show(tmp_path):
  s = Store(str(tmp_path / "f.sqlite"))
  _pool(s, 3)
  assert s.feed("ann", 5, extend=False) == []
  s.feed("ann", 2)
  assert len(s.feed("ann", 5, extend=False)) >= 2
  assert len(s.feed("ann", 100)) == 12  # the whole pool, then no more
  held = s.feed("bob", 100, hold={"c1"})  # a context still being written stays out, real post and all
  assert len(held) == 8 and "question 1?" not in {p["context"] for p in held}
  assert len(s.feed("bob", 100)) == 12


def test_concurrent_feeds_of_one_reader_never_share_a_position(tmp_path):
  path = str(tmp_path / "f.sqlite")
  s = Store(path)
  _pool(s, 40)
  errors = []

  def grow(k):
    try:
      st = Store(path)
      for n in range(1, 30):
        st.feed("ann", n + k)
    except Exception as e:  # noqa: BLE001
      errors.append(e)

  threads = [threading.Thread(target=grow, args=(k,)) for k in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  rows = sqlite3.connect(path).execute("SELECT position, post_id FROM feed WHERE reader = 'ann'").fetchall()
  assert sorted(r[0] for r in rows) == list(range(len(rows)))
  assert len({r[1] for r in rows}) == len(rows)


def test_wilson_intervals_match_newcombe_1998():
  # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (score, no continuity correction).
  for k, n, lo, hi in [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611),
                       (1, 29, 0.0061, 0.1718)]:
    got = results.wilson(k, n)
    assert got[0] == pytest.approx(lo, abs=1e-4) and got[1] == pytest.approx(hi, abs=1e-4), (k, n, got)
  assert results.wilson(0, 0) is None


def test_results_per_method_and_the_plot(tmp_path):
  counts = {REAL: {"posts": 10, "shown": 9, "readers": 2, "up": 6, "down": 2, "ai": 1},
            "persona_mux": {"posts": 10, "shown": 8, "readers": 2, "up": 3, "down": 3, "ai": 2},
            "base": {"posts": 10, "shown": 0, "readers": 0, "up": 0, "down": 0, "ai": 0},
            "soft_prompt": {"posts": 10, "shown": 7, "readers": 1, "up": 4, "down": 0, "ai": 0},  # rates of 1 and 0
            "drift": {"posts": 10, "shown": 7, "readers": 1, "up": 0, "down": 3, "ai": 3}}
  s = results.summarize(counts, readers=2)
  rows = {r["method"]: r for r in s["methods"]}
  assert [r["method"] for r in s["methods"]] == [REAL, "base", "soft_prompt", "persona_mux", "drift"]
  assert rows["soft_prompt"]["like_ci"][1] == 1.0 and rows["drift"]["like_ci"][0] == 0.0
  assert rows[REAL]["like_rate"] == 6 / 8 and rows[REAL]["ai_rate"] == 1 / 9
  assert rows[REAL]["like_ci"] == results.wilson(6, 8)
  assert rows["persona_mux"]["like_rate"] == 0.5 and rows["persona_mux"]["ai_rate"] == 2 / 8
  assert rows["base"]["like_rate"] is None and rows["base"]["like_ci"] is None
  g = s["generated"]
  assert (g["posts"], g["up"], g["down"], g["ai"]) == (40, 7, 6, 5)
  assert s["reactions"] == 27
  text = results.to_text(s)
  assert "Persona-Mux" in text and "false alarms" in text and "0.75 [" in text
  assert "<table" in results.to_html(s)
  png = results.plot(s, str(tmp_path / "r.png"))
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  json.dumps(s)  # JSON-ready


def test_export_writes_pairs_and_records_that_drift_and_add_personas_read(tmp_path):
  s = Store(str(tmp_path / "f.sqlite"))
  _pool(s, 6)
  conn = sqlite3.connect(s.path)
  ids = {text: i for i, text in conn.execute("SELECT id, text FROM posts")}
  for reader, votes in {"ann": {"real reply 0": "up", "base reply 0": "down", "persona_mux reply 0": "down",
                                "real reply 1": "up", "soft_prompt reply 1": "ai", "base reply 2": "up"},
                        "bob": {"real reply 0": "down", "persona_mux reply 0": "up"}}.items():
    for text, reaction in votes.items():
      s.react(reader, ids[text], reaction)
  out = export.write(s, str(tmp_path / "out"))
  pairs = [json.loads(line) for line in open(out["pairs_path"])]
  assert sorted((p["user"], p["chosen"], p["rejected"]) for p in pairs) == [
      ("ann", "real reply 0", "base reply 0"), ("ann", "real reply 0", "persona_mux reply 0"),
      ("bob", "persona_mux reply 0", "real reply 0")]
  assert all(p["prompt"] == "question 0?" for p in pairs)
  assert out["readers"] == {"ann": {"pairs": 2, "liked": 3}, "bob": {"pairs": 1, "liked": 1}}
  # The readers' own loaders accept them.
  loaded = drift.by_user(drift.load_pairs(out["pairs_path"]))
  assert sorted(loaded) == ["ann", "bob"] and len(loaded["ann"]) == 2
  records, skipped = data_lib.load_records(out["records_path"])
  assert not skipped
  assert sorted((r.cls, r.text, r.context) for r in records) == [
      ("ann", "base reply 2", "question 2?"), ("ann", "real reply 0", "question 0?"),
      ("ann", "real reply 1", "question 1?"), ("bob", "persona_mux reply 0", "question 0?")]


def _launch(*args):
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=cached_env(), capture_output=True, text=True,
                        timeout=120)


def test_report_and_export_launches(tmp_path):
  run = tmp_path / "run"
  missing = _launch("launch/feed_report.py", f"--workdir={run}")
  assert missing.returncode != 0 and "no feed database" in missing.stderr
  s = Store(str(run / "feed.sqlite"))
  (run / "run.json").write_text(json.dumps({"model_dir": "tiny-model"}))
  _pool(s, 4)
  for p, reaction in zip(s.feed("ann", 8), ["up", "down", "ai", "up", "down", "up", "up", "down"]):
    s.react("ann", p["id"], reaction)
  report = _launch("launch/feed_report.py", f"--workdir={run}")
  assert report.returncode == 0, report.stderr
  summary = json.load(open(run / "feed_results.json"))
  assert summary == json.loads(json.dumps(results.summarize(s.method_counts(), readers=1)))
  assert results.to_text(results.summarize(s.method_counts(), readers=1)) in report.stdout
  assert (run / "feed_results.png").read_bytes()[:4] == b"\x89PNG"
  out = tmp_path / "export"
  exported = _launch("launch/feed_export.py", f"--workdir={run}", f"--out={out}")
  assert exported.returncode == 0, exported.stderr
  assert f"--model=tiny-model --out={run / 'drift' / 'ann.json'}" in exported.stdout
  assert [json.loads(line) for line in open(out / "pairs.jsonl")] == export.pairs(s.reactions())
