"""Amazon Video Games: interactions in both formats, SASRec embeddings, spherical k-means."""

import json

import numpy as np
import pytest

from persomux import sasrec
from persomux.corpora import games
from persomux.data import DataError
from tests import games_like


def _two_populations(path, users=24, length=6):
  """Users 0..11 cycle through games a0..a3, users 12..23 through b0..b3."""
  rs = np.random.RandomState(0)
  lines = []
  for u in range(users):
    kind = "a" if u < users // 2 else "b"
    start = rs.randint(4)
    lines += [f"u{u} {kind}{(start + i) % 4}" for i in range(length)]
  lines += ["u_single a1", "this line has three fields"]
  path.write_text("\n".join(lines) + "\n")


def test_plain_sequences_cluster_by_taste(tmp_path):
  p = tmp_path / "seq.txt"
  _two_populations(p)
  records, skipped = games.read_games(str(p), num_classes=2, sasrec_steps=150, sasrec_dim=16, progress=False)
  assert skipped["user with one interaction"] == 1 and skipped["malformed line"] == 1
  by_class = {}
  for r in records:
    by_class.setdefault(r.cls, set()).add(r.text[0])
  assert sorted(map(sorted, by_class.values())) == [["a"], ["b"]]  # each cluster is one population
  r = records[0]
  assert r.context.startswith("Games played so far: ") and r.context.endswith("Next game:")


def test_amazon_jsonl_with_titles_and_time_order(tmp_path):
  reviews = tmp_path / "Video_Games.jsonl"
  rows = [{"user_id": "U1", "parent_asin": "B2", "timestamp": 20, "rating": 5.0},
          {"user_id": "U1", "parent_asin": "B1", "timestamp": 10, "rating": 4.0},
          {"user_id": "U1", "parent_asin": "B3", "timestamp": 30, "rating": 3.0},
          {"user_id": "U2", "parent_asin": "B1", "timestamp": 5}]
  reviews.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
  meta = tmp_path / "meta_Video_Games.jsonl"
  meta.write_text(json.dumps({"parent_asin": "B1", "title": "Star Racer"}) + "\n" +
                  json.dumps({"parent_asin": "B2", "title": "Castle Quest"}) + "\n")
  seqs, skipped = games.read_interactions(str(reviews))
  assert seqs["U1"] == ["B1", "B2", "B3"] and skipped["malformed line"] == 1
  records, skipped = games.read_games(str(reviews), meta_path=str(meta), num_classes=100, sasrec_steps=5,
                                      progress=False)
  assert skipped["user with one interaction"] == 1
  assert [(r.context, r.text) for r in records] == [
      ("Games played so far: Star Racer. Next game:", "Castle Quest"),
      ("Games played so far: Star Racer; Castle Quest. Next game:", "B3")]  # no title: the id


def test_bad_inputs(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with pytest.raises(DataError, match="empty.txt: file is empty"):
    games.read_games(str(empty), progress=False)
  singles = tmp_path / "singles.txt"
  singles.write_text("u1 a\nu2 b\n")
  with pytest.raises(DataError, match="no user has two or more interactions"):
    games.read_games(str(singles), progress=False)
  with pytest.raises(DataError, match="no such file"):
    games.read_games(str(tmp_path / "missing.jsonl"), progress=False)


def test_spherical_kmeans_known_answer():
  rs = np.random.RandomState(0)
  a = np.array([1.0, 0.0, 0.0]) + 0.05 * rs.randn(10, 3)
  b = np.array([0.0, 0.0, 3.0]) + 0.05 * rs.randn(10, 3)  # scale does not matter: cosine
  assign = sasrec.spherical_kmeans(np.concatenate([a, b]), 2, seed=1)
  assert len(set(assign[:10])) == 1 and len(set(assign[10:])) == 1 and assign[0] != assign[10]
  assert len(set(sasrec.spherical_kmeans(a, 50))) <= 10  # k capped at the number of points


def test_sasrec_learns_next_item_of_cycles():
  rs = np.random.RandomState(1)
  seqs = []
  for u in range(40):
    base, start = (1 if u % 2 else 5), rs.randint(4)
    seqs.append([base + (start + i) % 4 for i in range(8)])
  cfg = sasrec.SASRecConfig(num_items=8, max_len=8, d_model=16, steps=200, batch_size=32, learning_rate=1e-2)
  model, losses = sasrec.train_sasrec(seqs, cfg, progress=False)
  assert losses[-1] < 0.5 * losses[0]
  hidden = model(np.asarray(sasrec.left_pad([s[:-1] for s in seqs], cfg.max_len)))
  pred = np.asarray(model.logits(hidden[:, -1])).argmax(-1)
  assert (pred == np.array([s[-1] for s in seqs])).mean() > 0.9


def test_packed_rows_match_one_user_at_a_time():
  """Packing several users' windows into a row changes nothing: each user's
  hidden states equal those of the model run on that user's window alone."""
  rs = np.random.default_rng(0)
  seqs = [list(rs.integers(1, 31, rs.integers(2, 14))) for _ in range(37)]
  cfg = sasrec.SASRecConfig(num_items=30, max_len=12, d_model=16, num_heads=2, batch_size=8)
  model = sasrec.SASRec(cfg, sasrec.nnx.Rngs(0))
  run = sasrec.nnx.jit(lambda m, *args: m(*args))
  windows = [s[-(cfg.max_len + 1):] for s in seqs]
  alone = np.asarray(run(model, sasrec.left_pad([w[:-1] for w in windows], cfg.max_len)))
  epoch = list(sasrec.Packer(seqs, cfg.max_len, cfg.batch_size, np.random.default_rng(1))._epoch())
  assert len({b["inputs"].shape for b in epoch}) == 1  # one compiled shape
  seen = []
  for b in epoch:
    hidden = np.asarray(run(model, b["inputs"], b["positions"], b["segments"]))
    for seg in np.unique(b["segments"][b["segments"] > 0]):
      r, c = np.nonzero(b["segments"] == seg)
      assert len(set(r)) == 1  # a window never spans rows
      u = next(i for i, w in enumerate(windows) if i not in seen and w[:-1] == list(b["inputs"][r[0], c]))
      seen.append(u)
      assert list(b["targets"][r[0], c]) == windows[u][1:]
      np.testing.assert_allclose(hidden[r[0], c], alone[u, -len(c):], atol=1e-5)
  assert sorted(seen) == list(range(len(seqs)))  # every user exactly once an epoch


def test_games_like_corpus_has_the_shape_and_taste_sasrec_finds(tmp_path):
  """The generated stand-in for SASRec's Video Games file (tests/games_like.py, at a small size):
  exact counts, a long popularity tail, and genre taste that SASRec + k-means recover."""
  seqs, genre = games_like.make_sequences(users=600, items=800, interactions=5580, genres=4, seed=0)
  lengths = np.array([len(s) for s in seqs])
  assert len(seqs) == 600 and lengths.sum() == 5580 and lengths.min() >= 2 and lengths.max() > 40
  assert all(len(set(s)) == len(s) for s in seqs)  # a game once per user, as reviews are
  counts = np.bincount(np.concatenate(seqs), minlength=801)[1:]
  assert counts.min() >= 1 and np.sort(counts)[-80:].sum() > 0.3 * counts.sum()  # top 10% of games: >30%
  path = tmp_path / "Video_like.txt"
  games_like.write(str(path), seqs)
  assert path.read_text().splitlines()[:2] == [f"1 {seqs[0][0]}", f"1 {seqs[0][1]}"]

  def purity(steps):  # records whose next game is of their cluster's main genre (no titles: the text is the id)
    records, _ = games.read_games(str(path), num_classes=4, sasrec_steps=steps, sasrec_dim=16, progress=False)
    by_class = {}
    for r in records:
      by_class.setdefault(r.cls, []).append(genre[int(r.text)])
    return sum(np.bincount(g).max() for g in by_class.values()) / len(records)

  untrained, trained = purity(0), purity(300)
  assert untrained < 0.6 and trained > 0.65, (untrained, trained)  # measured 0.49 and 0.73
