"""Amazon Video Games: users clustered by SASRec embeddings into classes.

Inputs, in their original formats:
- Amazon Reviews 2023 JSONL (`user_id`, `parent_asin`, `timestamp` per
  review), optionally with the item metadata JSONL (`parent_asin`, `title`);
- plain `user item` sequence files, one interaction per line in time order
  (the format SASRec's own code uses).

Each user's interactions, in time order, train a SASRec model; users are
embedded by the mean of their games' SASRec embeddings and clustered with
spherical k-means (paper: 100 classes). An example is the user's game
history (titles when known, ids otherwise) as context and the next game as
text; all of a user's examples go to their cluster.
"""

from __future__ import annotations

import collections
import json
import os

from persomux.data import DataError, Record


def read_interactions(path: str) -> tuple[dict[str, list[str]], collections.Counter]:
  """`{user: [item, ...]}` in time order, from Amazon 2023 JSONL or a `user item` file."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file")
  if os.path.getsize(path) == 0:
    raise DataError(f"{path}: file is empty; expected interactions")
  skipped: collections.Counter = collections.Counter()
  events: dict[str, list[tuple[float, int, str]]] = collections.defaultdict(list)
  with open(path, encoding="utf-8", errors="replace") as f:
    first = f.readline()
    f.seek(0)
    is_json = first.lstrip().startswith("{")
    for n, line in enumerate(f):
      if not line.strip():
        continue
      if is_json:
        try:
          r = json.loads(line)
          user, item, ts = r["user_id"], r["parent_asin"], float(r.get("timestamp", n))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
          skipped["malformed line"] += 1
          continue
      else:
        parts = line.split()
        if len(parts) != 2:
          skipped["malformed line"] += 1
          continue
        (user, item), ts = parts, float(n)
      events[str(user)].append((ts, n, str(item)))
  if not events:
    raise DataError(f"{path}: no interactions could be read (skipped: {dict(skipped)}); expected Amazon "
                    "Reviews 2023 JSONL with user_id/parent_asin/timestamp, or 'user item' lines")
  return {u: [it for _, _, it in sorted(ev)] for u, ev in events.items()}, skipped


def read_titles(path: str | None) -> dict[str, str]:
  """`parent_asin -> title` from an Amazon 2023 item metadata JSONL (optional)."""
  if not path:
    return {}
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file (item metadata)")
  titles = {}
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      try:
        r = json.loads(line)
      except json.JSONDecodeError:
        continue
      if r.get("parent_asin") and r.get("title"):
        titles[str(r["parent_asin"])] = str(r["title"]).strip()
  return titles


def read_games(path: str, *, meta_path: str | None = None, num_classes: int = 100, max_history: int = 10,
               sasrec_steps: int = 2000, sasrec_dim: int = 50, seed: int = 0,
               progress: bool = True) -> tuple[list[Record], collections.Counter]:
  """Class-labelled records from video-game interactions (see module docstring)."""
  from persomux import sasrec

  seqs, skipped = read_interactions(path)
  titles = read_titles(meta_path)
  users = sorted(u for u, s in seqs.items() if len(s) >= 2)
  skipped["user with one interaction"] += len(seqs) - len(users)
  if not users:
    raise DataError(f"{path}: no user has two or more interactions; a history and a next game are needed")
  vocab = {it: i + 1 for i, it in enumerate(sorted({it for u in users for it in seqs[u]}))}
  ids = [[vocab[it] for it in seqs[u]] for u in users]
  cfg = sasrec.SASRecConfig(num_items=len(vocab), max_len=max(2, min(50, max(len(s) for s in ids))),
                            d_model=sasrec_dim, steps=sasrec_steps, seed=seed)
  model, _ = sasrec.train_sasrec(ids, cfg, progress=progress)
  # A user is embedded from their history (everything before the held-out next game).
  assign = sasrec.spherical_kmeans(sasrec.user_embeddings(model, [s[:-1] for s in ids]), num_classes, seed=seed)
  name = lambda it: titles.get(it, it)
  records = []
  for u, cluster in zip(users, assign):
    items = seqs[u]
    for i in range(1, len(items)):
      history = "; ".join(name(it) for it in items[max(0, i - max_history):i])
      records.append(Record(cls=f"gamers_{int(cluster):03d}", text=name(items[i]),
                            context=f"Games played so far: {history}. Next game:"))
  return records, skipped
