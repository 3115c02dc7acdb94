r"""A seeded stand-in for SASRec's Amazon Video Games file (`data/Video.txt`).

The real file (31,013 users, 23,715 items, about 287K interactions; `user
item` lines, users in order, each user's items in time order, ids from 1)
is not shipped. This writes one of the same shape and statistics:
- users with a few to a few hundred interactions (a heavy-tailed length
  distribution, mean about 9.3, as after SASRec's 5-core filtering);
- long-tailed item popularity (Zipf-like), every item used at least once;
- taste structure: items belong to genres, a user has one or two favourite
  genres and mostly stays in them, moving on from the genre of the last game.

  python tests/games_like.py --out=/tmp/Video_like.txt            # the real size
  python tests/games_like.py --out=small.txt --users=300 --items=200 --interactions=2800
"""

from __future__ import annotations

import argparse

import numpy as np

REAL_SIZE = dict(users=31013, items=23715, interactions=287000)


def make_sequences(users: int, items: int, interactions: int, *, genres: int = 20, seed: int = 0,
                   max_length: int = 800) -> tuple[list[list[int]], np.ndarray]:
  """Per-user item sequences (ids 1..items) in time order, and each item's genre `[items + 1]` (0 unused)."""
  rng = np.random.default_rng(seed)
  # Lengths: mostly 5 or more (SASRec keeps 5-core users and items; dropping items leaves some users with
  # 2-4) plus a heavy (lognormal) tail, scaled to the interaction count.
  floor = np.where(rng.random(users) < 0.05, rng.integers(2, 5, users), 5)
  raw = rng.lognormal(0.0, 1.2, users)
  lengths = np.clip(np.round(floor + raw * (interactions / users - floor.mean()) / raw.mean()), 2,
                    max_length).astype(int)
  while lengths.sum() != interactions:  # hit the total exactly
    step = np.sign(interactions - lengths.sum())
    i = rng.integers(users)
    if floor[i] <= lengths[i] + step <= max_length:
      lengths[i] += step
  genre = np.concatenate([[0], rng.integers(genres, size=items)])
  popularity = 1.0 / np.arange(1, items + 1) ** 0.9  # item rank r is drawn with weight r^-0.9
  popularity = popularity[rng.permutation(items)]
  by_genre = [np.flatnonzero(genre[1:] == g) + 1 for g in range(genres)]
  cdfs = [np.cumsum(popularity[ids - 1]) / popularity[ids - 1].sum() for ids in by_genre]
  seqs = []
  for n in lengths:
    liked = rng.choice(genres, size=1 + (rng.random() < 0.5), replace=False)
    # 85%: the genre of the last game; 10%: one of the user's favourites; 5%: any genre.
    g = rng.choice(liked)
    seq, seen = [], set()
    while len(seq) < n:
      u = rng.random()
      g = g if u < 0.85 else (rng.choice(liked) if u < 0.95 else rng.integers(genres))
      it = int(by_genre[g][min(np.searchsorted(cdfs[g], rng.random()), len(by_genre[g]) - 1)])
      if it not in seen:  # a user reviews a game once
        seen.add(it)
        seq.append(it)
    seqs.append(seq)
  # Every item is somebody's: an item nobody drew replaces the most popular game of a random user.
  used = np.zeros(items + 1, bool)
  for s in seqs:
    used[s] = True
  for it in np.flatnonzero(~used[1:]) + 1:
    while True:
      s = seqs[rng.integers(users)]
      j = int(np.argmax(popularity[np.asarray(s) - 1]))
      if it not in s:
        s[j] = int(it)
        break
  return seqs, genre


def write(path: str, seqs: list[list[int]]) -> None:
  with open(path, "w") as f:
    for u, seq in enumerate(seqs, start=1):
      f.write("".join(f"{u} {it}\n" for it in seq))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  for k, v in REAL_SIZE.items():
    parser.add_argument(f"--{k}", type=int, default=v)
  parser.add_argument("--seed", type=int, default=0)
  a = parser.parse_args()
  seqs, _ = make_sequences(a.users, a.items, a.interactions, seed=a.seed)
  write(a.out, seqs)
  lengths = np.array([len(s) for s in seqs])
  print(f"{a.out}: {len(seqs)} users, {len({i for s in seqs for i in s})} items, {lengths.sum()} interactions, "
        f"length min/median/mean/max {lengths.min()}/{int(np.median(lengths))}/{lengths.mean():.1f}/{lengths.max()}")


if __name__ == "__main__":
  main()
