"""What the feed's readers said, per method: like rates and mark-as-AI rates with
Wilson intervals, as JSON, a text table, an HTML table and a plot.

For each method (real posts first, then each generation method, then all
generated posts together):

- like rate: up / (up + down), the reactions that judged the post's quality;
- mark-as-AI rate: ai / (up + down + ai), every reaction; on generated posts it is
  how often readers spotted them, on real posts it is the false-alarm rate;
- each with a 95% Wilson score interval (well-behaved at 0, 1 and small counts);
- counts: posts in the pool, times shown, reactions of each kind, readers.
"""

from __future__ import annotations

import html
import math

from persomux.feed.store import REACTIONS, REAL

ORDER = (REAL, "base", "soft_prompt", "random_codebook", "persona_mux", "drift")
LABELS = {REAL: "real posts", "base": "base model (text persona only)", "soft_prompt": "soft prompt",
          "random_codebook": "random codebook", "persona_mux": "Persona-Mux", "drift": "Persona-Mux + Drift",
          "generated": "all generated"}
Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
  """The Wilson score interval of k successes in n trials (None when n = 0)."""
  if n == 0:
    return None
  p = k / n
  denom = 1 + z * z / n
  center = (p + z * z / (2 * n)) / denom
  half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  # At k = 0 and k = n the bounds are 0 and 1 exactly (rounding would put them a hair inside).
  return 0.0 if k == 0 else max(0.0, center - half), 1.0 if k == n else min(1.0, center + half)


def _row(method: str, c: dict) -> dict:
  judged = c["up"] + c["down"]
  reacted = judged + c["ai"]
  return {"method": method, "label": LABELS.get(method, method), "posts": c["posts"], "shown": c["shown"],
          "readers": c["readers"], "reactions": reacted, **{r: c[r] for r in REACTIONS},
          "like_rate": c["up"] / judged if judged else None, "like_ci": wilson(c["up"], judged),
          "ai_rate": c["ai"] / reacted if reacted else None, "ai_ci": wilson(c["ai"], reacted)}


def summarize(counts: dict[str, dict[str, int]], readers: int | None = None) -> dict:
  """Results from `Store.method_counts()`: `{"methods": [row per method], "generated":
  row over every generated post, "reactions", "readers"}`; a row holds the counts,
  `like_rate`, `like_ci`, `ai_rate`, `ai_ci` (None without reactions)."""
  methods = [m for m in ORDER if m in counts] + sorted(m for m in counts if m not in ORDER)
  rows = [_row(m, counts[m]) for m in methods]
  total = {k: sum(counts[m][k] for m in methods if m != REAL) for k in ("posts", "shown", *REACTIONS)}
  generated = _row("generated", {**total, "readers": 0})
  generated.pop("readers")
  return {"methods": rows, "generated": generated, "reactions": sum(r["reactions"] for r in rows),
          "readers": readers, "confidence": 0.95}


def count(n: int, noun: str) -> str:
  return f"{n} {noun}{'' if n == 1 else 's'}"


def _rate(rate, ci) -> str:
  if rate is None:
    return "-"
  return f"{rate:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def table_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
  """The results table as (header, rows of strings)."""
  header = ["method", "posts", "shown", "up", "down", "ai", "like rate [95% CI]", "marked AI [95% CI]"]
  rows = []
  for r in summary["methods"] + ([summary["generated"]] if summary["generated"]["posts"] else []):
    ai = _rate(r["ai_rate"], r["ai_ci"])
    if r["method"] == REAL and r["ai_rate"] is not None:
      ai += " (false alarms)"
    rows.append([r["label"], str(r["posts"]), str(r["shown"]), str(r["up"]), str(r["down"]), str(r["ai"]),
                 _rate(r["like_rate"], r["like_ci"]), ai])
  return header, rows


def to_text(summary: dict) -> str:
  header, rows = table_rows(summary)
  widths = [max(len(x) for x in col) for col in zip(header, *rows)]
  line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
  readers = "" if summary["readers"] is None else f", {count(summary['readers'], 'reader')}"
  return "\n".join([line(header), *(line(r) for r in rows),
                    f"{count(summary['reactions'], 'reaction')}{readers}; like rate = up / (up + down), marked AI = "
                    "ai / all reactions (on real posts: false alarms); 95% Wilson intervals"])


def to_html(summary: dict) -> str:
  header, rows = table_rows(summary)
  head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
  return f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def plot(summary: dict, path):
  """Writes the like rate and the mark-as-AI rate per method, with their intervals, to `path`
  (a file name or a binary file object) as PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = summary["methods"]
  labels = [r["label"] for r in rows]
  fig, axes = plt.subplots(1, 2, figsize=(10, 0.6 * len(rows) + 1.8), sharey=True)
  for ax, (rate, ci, title) in zip(axes, [("like_rate", "like_ci", "like rate: up / (up + down)"),
                                          ("ai_rate", "ai_ci", "marked as AI (real posts: false alarms)")]):
    ys = list(range(len(rows)))
    vals = [r[rate] if r[rate] is not None else 0.0 for r in rows]
    lo = [max(0.0, r[rate] - r[ci][0]) if r[rate] is not None else 0.0 for r in rows]
    hi = [max(0.0, r[ci][1] - r[rate]) if r[rate] is not None else 0.0 for r in rows]
    colors = ["#777777" if r["method"] == REAL else "#3b6ea5" for r in rows]
    ax.barh(ys, vals, xerr=[lo, hi], color=colors, capsize=4)
    for y, r in zip(ys, rows):
      n = r["up"] + r["down"] if rate == "like_rate" else r["reactions"]
      ax.text(1.02, y, f"n={n}", va="center", fontsize=8)
    ax.set_xlim(0, 1.15)
    ax.set_title(title, fontsize=10)
    ax.set_yticks(ys, labels)
  axes[0].invert_yaxis()  # the axes share y: inverting one inverts both (real posts on top)
  fig.suptitle(f"feed results: {count(summary['reactions'], 'reaction')}, 95% Wilson intervals", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=110, format="png")
  plt.close(fig)
  return path
