"""A feed's reactions as training data: each reader becomes Drift pairs and a persona.

- `pairs.jsonl`: for each reader and each context on which they upvoted one post
  and downvoted another, one pair per (upvoted, downvoted) combination whose texts differ:
  `{"prompt": context, "chosen": upvoted text, "rejected": downvoted text,
  "user": reader}`, what `launch/drift.py fit` reads (one weights file per user).
- `records.jsonl`: every post a reader upvoted, as an add_personas record
  `{"class": reader, "text", "context"}`, what `launch/add_personas.py` reads
  (each reader one new persona).

"Mark as AI" reactions enter neither: they say where a post came from, not
whether the reader liked it.
"""

from __future__ import annotations

import collections
import itertools
import os

from persomux import data as data_lib


def pairs(reactions: list[dict]) -> list[dict]:
  """Preference pairs from `Store.reactions()` rows."""
  groups: dict[tuple, dict[str, list[dict]]] = collections.defaultdict(lambda: {"up": [], "down": []})
  for r in reactions:
    if r["reaction"] in ("up", "down"):
      groups[(r["reader"], r["context_key"])][r["reaction"]].append(r)
  out = []
  for (reader, _), g in sorted(groups.items()):
    for up, down in itertools.product(g["up"], g["down"]):
      if up["text"] == down["text"]:
        continue  # two posts that read the same say nothing about which is preferred
      out.append({"prompt": up["context"], "chosen": up["text"], "rejected": down["text"], "user": reader})
  return out


def liked_records(reactions: list[dict]) -> list[dict]:
  """add_personas records (class = the reader) of the posts each reader upvoted."""
  return [{"class": r["reader"], "text": r["text"], "context": r["context"]} for r in reactions
          if r["reaction"] == "up"]


def write(store, out_dir: str) -> dict:
  """Writes `OUT/pairs.jsonl` and `OUT/records.jsonl` from a feed `Store`; returns
  per-reader counts `{"readers": {name: {"pairs", "liked"}}, "pairs", "records", paths}`."""
  rows = store.reactions()
  ps, recs = pairs(rows), liked_records(rows)
  os.makedirs(out_dir, exist_ok=True)
  paths = {"pairs_path": os.path.join(out_dir, "pairs.jsonl"), "records_path": os.path.join(out_dir, "records.jsonl")}
  data_lib.write_jsonl(ps, paths["pairs_path"])
  data_lib.write_jsonl(recs, paths["records_path"])
  per = collections.defaultdict(lambda: {"pairs": 0, "liked": 0})
  for p in ps:
    per[p["user"]]["pairs"] += 1
  for r in recs:
    per[r["class"]]["liked"] += 1
  return {"readers": dict(sorted(per.items())), "pairs": len(ps), "records": len(recs), **paths}
