"""The evaluation report: `report.md` (tables laid out like the paper's),
`report.json` and PNG plots, written into a workdir.

Plots (matplotlib, no display needed):
  loss_curves.png   training loss per stage and the held-out test loss, from metrics.jsonl
  mixtures.png      a 2-D map (PCA) of the class mixture vectors m_i, stage 1 and stage 2
  bias_sweep.png    generation loss (and test loss) of Persona-Mux against the bias scale
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

LABELS = {
    "base": "Base (text persona)", "icl": "+ ICL", "lora": "+ LoRA", "soft_prompt": "+ SoftPrompt",
    "random_codebook": "+ Random codebook", "persona_mux": "+ Persona-Mux", "persona_mux_half_bias": "+ Half Bias",
    "persona_mux_no_bias": "+ No Bias",
}


def label(name: str) -> str:
  if name in LABELS:
    return LABELS[name]
  if name.startswith("persona_mux_bias_"):
    return f"+ Bias x{name.rsplit('_', 1)[1]}"
  return name


def _fmt(v, digits=3) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "-"
  if isinstance(v, float):
    return f"{v:.{digits}f}"
  return f"{v:,}" if isinstance(v, int) else str(v)


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def _bold_best(values: dict[str, float], lower: bool = True, among=None) -> dict[str, str]:
  """Formatted values, the best among `among` (default: all) in bold."""
  keys = [k for k in (among or values) if k in values and values[k] is not None and not math.isnan(values[k])]
  best = (min if lower else max)(keys, key=lambda k: values[k]) if keys else None
  return {k: (f"**{_fmt(v)}**" if k == best else _fmt(v)) for k, v in values.items()}


def markdown(rep: dict[str, Any]) -> str:
  s = rep["setup"]
  methods = list(rep["test_loss"])
  tuned = [m for m in methods if m not in ("base", "icl")]
  out = ["# Evaluation on the held-out classes", "",
         f"{s['classes']} held-out classes, {s['test_examples']} test examples ({s['test_tokens']:,} target "
         f"tokens). Generations: {s['generations_per_method']} per method from {s['generation_classes']} "
         f"classes. Judge: {s['judge']}.", ""]
  tl = _bold_best(rep["test_loss"], among=tuned)
  out += ["## Test loss on the fine-tuning set (paper Table 2)", "",
          _table(["method", "test loss (nats/token)"], [[label(m), tl[m]] for m in methods]), ""]
  gl = _bold_best(rep["generation_loss"], among=tuned)
  out += [f"## Generation loss under the judge (paper Table 4; lowest among fine-tuning methods in bold)", "",
          _table(["method", "generation loss"], [[label(m), gl[m]] for m in rep["generation_loss"]]), ""]
  mode = s["discrimination_mode"]
  what = ("the judge singles out the generated text among 3 real ones (lower is better)" if mode == "fake"
          else "the judge picks the generated item as the next one among 3 decoys (higher is better)")
  out += [f"## Discrimination (paper Table 5, out of {s['discrimination_trials']})", "", f"Trials in which {what}.",
          "", _table(["method", f"of {s['discrimination_trials']}"],
                     [[label(m), _fmt(v, 2)] for m, v in rep["discrimination"].items()]), ""]
  if rep["loss_improvement_stats"]:
    out += ["## Loss improvement during fine-tuning (paper Table 6)", "",
            "Per-class test loss before stage 2 minus after it.", "",
            _table(["method", "mean", "std", "max", "min"],
                   [[label(m)] + [_fmt(st[k]) for k in ("mean", "std", "max", "min")]
                    for m, st in rep["loss_improvement_stats"].items()]), ""]
  out += ["## Trainable parameters (paper Table 7)", "",
          _table(["method", "global", "per class"],
                 [[label(m), _fmt(p["global"]) if p["global"] else "-", _fmt(p["per_class"]) if p["per_class"] else "-"]
                  for m, p in rep["params"].items()]), ""]
  if rep["embedding_variance"]:
    out += [f"## Embedding diversity and fidelity (S.L.O.P.; {s['embedding_model']})", "",
            "Variance: spread of a class's generations around their mean embedding. Similarity: cosine of the "
            "mean embeddings of a class's generated and real texts. Higher is better for both.", "",
            _table(["method", "variance", "similarity"],
                   [[label(m), _fmt(rep["embedding_variance"][m]), _fmt(rep["embedding_similarity"][m])]
                    for m in rep["embedding_variance"]]), ""]
  if rep.get("bias_sweep"):
    out += ["## Bias-scale sweep (Persona-Mux)", "",
            _table(["bias scale", "test loss", "generation loss"],
                   [[k, _fmt(v["test_loss"]), _fmt(v["generation_loss"])] for k, v in rep["bias_sweep"].items()]), ""]
  out += ["Plots: `loss_curves.png`, `mixtures.png`, `bias_sweep.png`.", ""]
  show = rep.get("showcase") or {}
  if show.get("personas"):
    out += ["## Two unseen personas, one message (greedy replies)", "", f"User: {show['context']!r}", ""]
    for p in show["personas"]:
      out += [f"**{p['class']}** (one of their real test replies: {p['real']!r} to {p['real_context']!r})", ""]
      out += [f"- {label(m)}: {g!r}" for m, g in p["replies"].items()] + [""]
  if rep.get("samples"):
    smp = rep["samples"][0]
    out += [f"## A sample ({smp['class']})", "", f"Prompt context: {smp['context']!r}", "",
            f"Real text: {smp['real']!r}", ""]
    out += [f"- {label(m)}: {g!r}" for m, g in smp["generations"].items()] + [""]
  return "\n".join(out)


def _plt():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def plot_loss_curves(metrics_path: str, out: str) -> bool:
  """Training loss per stage (smoothed) and eval test loss; False when there is nothing to plot."""
  if not os.path.isfile(metrics_path):
    return False
  train, evals = {}, {}
  with open(metrics_path) as f:
    for line in f:
      try:
        m = json.loads(line)
      except json.JSONDecodeError:
        continue
      if m.get("event") == "train":
        train.setdefault(m["stage"], {})[m["step"]] = m["loss"]  # a resumed run rewrites steps: keep the last
      elif m.get("event") == "eval" and "test_loss" in m:
        evals.setdefault(m["stage"], {})[m["step"]] = m["test_loss"]
  stages = list(train)
  if not stages:
    return False
  plt = _plt()
  cols = min(3, len(stages))
  rows = -(-len(stages) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
  for ax, stage in zip(axes.flat, stages):
    steps = sorted(train[stage])
    loss = np.array([train[stage][s] for s in steps])
    w = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
    ax.plot(steps, loss, alpha=0.25, color="C0")
    ax.plot(steps[w - 1:], smooth, color="C0", label="train")
    if stage in evals:
      es = sorted(evals[stage])
      ax.plot(es, [evals[stage][s] for s in es], "o-", color="C3", label="test")
    ax.set_title(stage)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
  for ax in list(axes.flat)[len(stages):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return True


def plot_mixtures(mixtures: dict[str, tuple[np.ndarray, list[str]]], out: str, max_labels: int = 20) -> bool:
  """PCA of every class's mixture vector (fit on all of them together)."""
  if not mixtures:
    return False
  allm = np.concatenate([m for m, _ in mixtures.values()], 0).astype(np.float64)
  if len(allm) < 2:
    return False
  centered = allm - allm.mean(0)
  _, sv, vt = np.linalg.svd(centered, full_matrices=False)
  comps = vt[:2] if len(vt) >= 2 else np.vstack([vt, np.zeros_like(vt)])
  var = (sv[:2] ** 2) / max((sv ** 2).sum(), 1e-12)
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 5))
  for i, (name, (m, classes)) in enumerate(mixtures.items()):
    xy = (np.asarray(m, np.float64) - allm.mean(0)) @ comps.T
    ax.scatter(xy[:, 0], xy[:, 1], s=14 if i == 0 else 30, alpha=0.5 if i == 0 else 0.9, label=f"{name} ({len(m)})",
               color="0.6" if i == 0 and len(mixtures) > 1 else f"C{i}")
    if i == len(mixtures) - 1:
      for (x, y), c in list(zip(xy, classes))[:max_labels]:
        ax.annotate(c, (x, y), fontsize=6)
  ax.set_xlabel(f"PC1 ({var[0]:.0%} of variance)")
  ax.set_ylabel(f"PC2 ({var[1] if len(var) > 1 else 0:.0%} of variance)")
  ax.set_title("Class mixture vectors m_i (PCA)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return True


def plot_bias_sweep(rep: dict[str, Any], out: str) -> bool:
  sweep = rep.get("bias_sweep") or {}
  pts = sorted((float(k), v["generation_loss"], v["test_loss"]) for k, v in sweep.items()
               if v["generation_loss"] is not None)
  if not pts:
    return False
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="Persona-Mux: generation loss")
  ax.plot([p[0] for p in pts], [p[2] for p in pts], "s--", label="Persona-Mux: test loss")
  for i, m in enumerate(k for k in rep["generation_loss"] if not k.startswith("persona_mux")):
    ax.axhline(rep["generation_loss"][m], color=f"C{i + 2}", lw=0.8, ls=":", label=f"{label(m)} (generation)")
  ax.set_xlabel("bias scale")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title("Bias-scale sweep")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return True


def write(workdir: str, rep: dict[str, Any], mixtures=None) -> dict[str, str]:
  """Writes report.md, report.json and the plots; returns `{name: path}` of what was written."""
  os.makedirs(workdir, exist_ok=True)
  paths = {"report.json": os.path.join(workdir, "report.json"), "report.md": os.path.join(workdir, "report.md")}
  tmp = paths["report.json"] + ".tmp"
  with open(tmp, "w") as f:
    json.dump(rep, f, indent=2, default=float)
  os.replace(tmp, paths["report.json"])
  with open(paths["report.md"], "w") as f:
    f.write(markdown(rep))
  for name, ok in (("loss_curves.png", lambda p: plot_loss_curves(os.path.join(workdir, "metrics.jsonl"), p)),
                   ("mixtures.png", lambda p: plot_mixtures(mixtures or {}, p)),
                   ("bias_sweep.png", lambda p: plot_bias_sweep(rep, p))):
    path = os.path.join(workdir, name)
    if ok(path):
      paths[name] = path
  return paths
