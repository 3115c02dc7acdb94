"""Stage 1 and stage 2 as resumable runs over a workdir.

Workdir layout:
  run.json                  the config of the run (trunk path, data, sizes)
  split.json                pretraining / finetuning classes and their text personas
  checkpoints/<stage>/      orbax training checkpoints (prompt, optimizer, position)
  prompt/<name>/            final prompt state of a stage (orbax) with its metadata
  personas/<job>.json       an add_personas job: its personas, config fingerprint, status, results
  metrics.jsonl             one JSON object per train step / evaluation
"""

from __future__ import annotations

import collections
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persomux import data as data_lib
from persomux import prompts as prompts_lib
from persomux import train
from persomux.checkpoint import Checkpointer, Part
from persomux.models import lora as lora_lib

METHODS = ("persona_mux", "soft_prompt", "random_codebook")
_TRAINS = {"persona_mux": prompts_lib.Mixtures, "random_codebook": prompts_lib.Mixtures,
           "soft_prompt": prompts_lib.ClassPrompts}


def _cfg_dict(config) -> dict:
  return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def save_run(config, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, "run.json"), "w") as f:
    json.dump(_cfg_dict(config), f, indent=2)


def _read_workdir_json(workdir: str, name: str) -> dict:
  path = os.path.join(workdir, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: missing; run stage 1 (launch/pretrain.py) with this --workdir first")
  with open(path) as f:
    return json.load(f)


def load_run(workdir: str) -> dict:
  """The config a run was started with (`run.json`)."""
  return _read_workdir_json(workdir, "run.json")


def load_trunk(config, mesh=None):
  from persomux.models.params import load_model

  c = config if isinstance(config, dict) else _cfg_dict(config)
  if not c.get("model_dir"):
    raise ValueError("config.model_dir is empty; set it to a local Hugging Face checkpoint directory, "
                     "a .gguf file or a shipped model name")
  # An empty dtype (the default) means the checkpoint's own.
  return load_model(c["model_dir"], dtype=c.get("dtype") or None, remat=c.get("remat", False), mesh=mesh)


# --- data ----------------------------------------------------------------------------


class Split:
  """The class split of a run: computed once, then read back from `split.json`."""

  def __init__(self, pretrain: list[str], finetune: list[str], personas: dict[str, str | None]):
    self.pretrain, self.finetune, self.personas = pretrain, finetune, personas

  @classmethod
  def make(cls, records, config, workdir: str | None) -> "Split":
    path = os.path.join(workdir, "split.json") if workdir else None
    if path and os.path.isfile(path):
      with open(path) as f:
        d = json.load(f)
      return cls(d["pretrain"], d["finetune"], d.get("personas", {}))
    pre, fine = data_lib.split_classes(records, config["data"]["finetune_fraction"], config["seed"])
    personas = {}
    for r in records:
      if r.persona and r.cls not in personas:
        personas[r.cls] = r.persona
    split = cls(pre, fine, personas)
    if path:  # every process computes the same split; process 0 writes it
      _write_json(path, {"pretrain": pre, "finetune": fine, "personas": personas})
    return split


def class_records(records, classes: list[str], config, cap_key: str) -> tuple[list, list]:
  """(train, test) records of `classes`: capped per class, then split per class (seeded)."""
  dc = config["data"]
  rs = data_lib.select_classes(records, classes, source=dc.get("path") or "data")
  rs = data_lib.cap_per_class(rs, dc.get(cap_key, 0), seed=config["seed"])
  return data_lib.split_train_test(rs, dc["test_fraction"], seed=config["seed"])


def make_examples(records, classes: list[str], formatter, config, cap_key: str, counts) -> tuple[list, list]:
  """(train, test) examples of `classes`, ids in the order of `classes`."""
  vocab = data_lib.ClassVocab(classes)
  tr, te = class_records(records, classes, config, cap_key)
  enc = lambda x: data_lib.encode(x, formatter, vocab, config["data"]["max_len"], counts)
  return enc(tr), enc(te)


def formatter_for(tokenizer, config) -> data_lib.PromptFormatter:
  dc = config["data"]
  return data_lib.PromptFormatter(tokenizer, dc["template"], dc["use_chat_template"])


def _eval_batches(examples, config) -> list[dict]:
  bs = config["pretrain"]["batch_size"]
  buckets = data_lib.default_buckets(config["data"]["max_len"])
  return data_lib.ShuffledBatches(examples, bs, buckets=buckets, shuffle=False).all_batches()


# --- prompt state on disk ---------------------------------------------------------------


def embedding_std(trunk) -> float:
  """Standard deviation of the trunk's input embeddings as `Trunk.embed` returns
  them (Gemma's sqrt(d) scale included)."""
  table = trunk.embed_tokens[...]
  return float(jnp.std(table.astype(jnp.float32))) * trunk.config.embed_scale


def init_std(trunk, pc: dict) -> float:
  """`prompt.init_std`, where 0 means "the trunk's own embedding scale" (`embedding_std`)."""
  return float(pc["init_std"]) if pc["init_std"] > 0 else embedding_std(trunk)


def build_prompt(method: str, num_classes: int, d_model: int, pc: dict, seed: int, std: float | None = None):
  """A fresh prompt module; `std` (default `pc["init_std"]`) is the scale of its random init."""
  rngs = nnx.Rngs(seed)
  std = pc["init_std"] if std is None else std
  sizes = dict(num_codes=pc["num_codes"], code_tokens=pc["code_tokens"], bias_tokens=pc["bias_tokens"],
               init_std=std, rngs=rngs)
  if method == "persona_mux":
    return prompts_lib.PersonaMux(num_classes, d_model, **sizes)
  if method == "random_codebook":
    return prompts_lib.RandomCodebook(num_classes, d_model, **sizes)
  if method == "soft_prompt":
    return prompts_lib.SoftPrompt(num_classes, d_model, num_tokens=pc["soft_prompt_tokens"],
                                  init_std=std, rngs=rngs)
  raise ValueError(f"prompt method {method!r} is unknown; expected one of {', '.join(METHODS)}")


def save_prompt(workdir: str, name: str, module, meta: dict, key: str = "prompt") -> None:
  """Final state of a stage under `prompt/<name>` (a `checkpoint.Part` for LoRA adapters)."""
  ck = Checkpointer(os.path.join(workdir, "prompt", name), keep=1)
  # A new step, so a rerun replaces the old state atomically (orbax drops it after the save).
  latest = ck.latest_step()
  ck.save(0 if latest is None else latest + 1, {key: module}, meta)
  ck.close()


def load_prompt(workdir: str, name: str, d_model: int):
  """`(module, meta)` of the final prompt state `name` ("pretrain", "finetune_persona_mux", ...)."""
  directory = os.path.join(workdir, "prompt", name)
  ck = Checkpointer(directory, keep=1)
  if ck.latest_step() is None:
    raise FileNotFoundError(f"{directory}: no prompt state; run the stage that writes it first")
  meta = ck.read_meta()
  module = build_prompt(meta["method"], len(meta["classes"]), d_model, meta["prompt"], 0)
  ck.restore({"prompt": module})
  ck.close()
  return module, meta


def find_persona(workdir: str, persona: str, method: str, d_model: int):
  """`(module, class_id, stage_name)` of the trained prompt holding `persona`
  (the add_personas jobs, newest first, then stage 2, then stage 1). Raises
  KeyError listing known personas."""
  names = [*(job_stage(j, method) for j in reversed(persona_jobs(workdir))), f"finetune_{method}",
           "pretrain" if method == "persona_mux" else f"pretrain_{method}"]
  seen = []
  for name in names:
    if not os.path.isdir(os.path.join(workdir, "prompt", name)):
      continue
    module, meta = load_prompt(workdir, name, d_model)
    if persona in meta["classes"]:
      return module, meta["classes"].index(persona), name
    seen.extend(meta["classes"])
  if not seen:
    raise FileNotFoundError(f"{workdir}: no trained {method} prompt; run pretrain/finetune first")
  raise KeyError(f"persona {persona!r} is not in {workdir}; known personas include {seen[:8]}")


# --- stages -------------------------------------------------------------------------------


def _stage_inputs(config, workdir, tokenizer, records):
  """`(config dict, records, split, formatter, truncation counts)` shared by every stage."""
  config = _cfg_dict(config)
  if records is None:
    records, _ = data_lib.load_records(config["data"]["path"])
  split = Split.make(records, config, workdir)
  return config, records, split, formatter_for(tokenizer, config), collections.Counter()


def pretrain(config, workdir: str, trunk, tokenizer, records=None, *, method: str = "persona_mux",
             progress: bool = True, on_step=None, mesh=None) -> dict[str, Any]:
  """Stage 1 on the pretraining classes; writes `prompt/pretrain` (or `prompt/pretrain_<method>`).

  PersonaMux: a bias-only warmup (`pretrain.warmup_epochs`, m_i = 0, W
  frozen), then W, b and every m_i jointly for `pretrain.epochs`.
  """
  config, records, split, fmt, counts = _stage_inputs(config, workdir, tokenizer, records)
  tr, te = make_examples(records, split.pretrain, fmt, config, "max_per_class_pretrain", counts)
  pc, tc = config["prompt"], config["pretrain"]
  prompt = build_prompt(method, len(split.pretrain), trunk.config.d_model, pc, config["seed"],
                        init_std(trunk, pc))
  buckets = data_lib.default_buckets(config["data"]["max_len"])
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  src = data_lib.ShuffledBatches(tr, tc["batch_size"], seed=config["seed"], buckets=buckets, pad_id=pad,
                                 shard=jax.process_index(), num_shards=jax.process_count())
  if tc["batch_size"] % _batch_unit(mesh):
    raise ValueError(f"pretrain.batch_size={tc['batch_size']} must be a multiple of {_batch_unit(mesh)} "
                     "(processes x data x fsdp mesh axes)")
  spe = src.steps_per_epoch()
  optim = train.OptimConfig.from_config(tc)
  phases = []
  if method in ("persona_mux", "random_codebook") and tc["warmup_epochs"]:
    phases.append(train.Phase("warmup", prompts_lib.Bias, src, tc["warmup_epochs"] * spe, optim))
  phases.append(train.Phase("joint", prompts_lib.PromptParam, src, tc["epochs"] * spe, optim))
  test_batches = _eval_batches(te, config) if te else []
  eval_fn = (lambda: _summary(train.evaluate(trunk, prompt, test_batches), split.pretrain)) \
      if test_batches else None
  stage = "pretrain" if method == "persona_mux" else f"pretrain_{method}"
  result = train.run_phases(trunk, prompt, phases, workdir=workdir, checkpoint_every=tc["checkpoint_every"],
                            eval_fn=eval_fn, eval_every=tc["eval_every"], stage=stage, progress=progress,
                            on_step=on_step, mesh=mesh)
  final = train.evaluate(trunk, prompt, test_batches) if test_batches else {"loss": float("nan")}
  save_prompt(workdir, stage, prompt, {"method": method, "classes": split.pretrain, "prompt": pc,
                                      "test_loss": final["loss"]})
  return {"prompt": prompt, "test_loss": final["loss"], "train_examples": len(tr), "test_examples": len(te),
          "classes": len(split.pretrain), "truncated": dict(counts), **result}


def _batch_unit(mesh) -> int:
  """Rows a global batch must be a multiple of."""
  data_shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
  return int(np.lcm(data_shards, jax.process_count()))


def _summary(ev: dict, names: list[str]) -> dict:
  return {"test_loss": ev["loss"], "test_tokens": ev["tokens"],
          "per_class": {names[c]: round(v, 5) for c, v in ev["per_class"].items()}}


def finetune(config, workdir: str, trunk, tokenizer, records=None, *, method: str = "persona_mux",
             progress: bool = True, on_step=None, codebook_from: str = "pretrain", mesh=None) -> dict[str, Any]:
  """Stage 2 on the held-out classes: only their per-class parameters train.

  persona_mux: W and b from stage 1, new m_i. random_codebook: b from stage 1,
  W replaced by a fixed random codebook of the same size and scale (the
  paper's ablation). soft_prompt: independent per-class prompts. All new
  classes train together, full batch by default (`finetune.batch_size=0`).
  Writes `prompt/finetune_<method>`.
  """
  config, records, split, fmt, counts = _stage_inputs(config, workdir, tokenizer, records)
  data_lib.check_disjoint(split.pretrain, split.finetune, source=os.path.join(workdir, "split.json"))
  return _train_new_classes(config, workdir, trunk, records, split.finetune, fmt, counts, f"finetune_{method}",
                            method=method, codebook_from=codebook_from, meta={}, progress=progress,
                            on_step=on_step, mesh=mesh)


def _train_new_classes(config: dict, workdir: str, trunk, records, classes: list[str], fmt, counts, stage: str, *,
                       method: str, codebook_from: str, meta: dict, progress: bool, on_step, mesh) -> dict[str, Any]:
  """Stage 2 for `classes`: their per-class parameters train on their train
  split, everything else stays frozen; writes `prompt/<stage>`."""
  tr, te = make_examples(records, classes, fmt, config, "max_per_class_finetune", counts)
  pc, fc = config["prompt"], config["finetune"]
  d = trunk.config.d_model
  prompt = build_prompt(method, len(classes), d, pc, config["seed"] + 1, init_std(trunk, pc))
  if method in ("persona_mux", "random_codebook"):
    base, _ = load_prompt(workdir, codebook_from, d)
    prompt.bias[...] = base.bias[...]
    if method == "persona_mux":
      prompt.codebook[...] = base.codebook[...]
    else:
      scale = float(np.std(np.asarray(base.codebook[...])))
      prompt.codebook[...] = scale * jax.random.normal(jax.random.key(config["seed"] + 2), prompt.codebook.shape)
  buckets = data_lib.default_buckets(config["data"]["max_len"])
  pad = fmt.tok.pad_token_id if fmt.tok.pad_token_id is not None else 0
  bsz = fc["batch_size"] or len(tr)
  # Full batch: round up (empty rows) so every process and data shard gets equal rows.
  unit = _batch_unit(mesh)
  bsz = -(-bsz // unit) * unit
  src = data_lib.ShuffledBatches(tr, bsz, seed=config["seed"], buckets=buckets, pad_id=pad,
                                 shard=jax.process_index(), num_shards=jax.process_count())
  test_batches = _eval_batches(te, config) if te else []
  initial = train.evaluate(trunk, prompt, test_batches) if test_batches else {"loss": float("nan"),
                                                                              "per_class": {}}
  eval_fn = (lambda: _summary(train.evaluate(trunk, prompt, test_batches), classes)) \
      if test_batches else None
  phase = train.Phase("finetune", _TRAINS[method], src, fc["steps"], train.OptimConfig.from_config(fc))
  result = train.run_phases(trunk, prompt, [phase], workdir=workdir, checkpoint_every=fc["checkpoint_every"],
                            eval_fn=eval_fn, eval_every=fc["eval_every"], stage=stage, progress=progress,
                            on_step=on_step, mesh=mesh)
  final = train.evaluate(trunk, prompt, test_batches) if test_batches else initial
  save_prompt(workdir, stage, prompt, {"method": method, "classes": classes, "prompt": pc,
                                      "test_loss": final["loss"], **meta})
  return {"prompt": prompt, "test_loss": final["loss"], "initial_test_loss": initial["loss"],
          "per_class": {classes[c]: v for c, v in final["per_class"].items()},
          "initial_per_class": {classes[c]: v for c, v in initial["per_class"].items()},
          "test_batches": test_batches, "classes": classes, "train_examples": len(tr), "test_examples": len(te),
          "truncated": dict(counts), "stage": stage, **result}


# --- personas added after stage 1 (add_personas jobs) ---------------------------------------


_JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class JobError(ValueError):
  """An add_personas job that cannot run as asked (a name clash, a changed config)."""


def check_job_name(name: str) -> None:
  """A job's name becomes a file and directory name: raises JobError unless it is a safe one."""
  if not _JOB_NAME.fullmatch(name or ""):
    raise JobError(f"job name {name!r}: use letters, digits, '_', '.' or '-', starting with a letter or digit")


def persona_jobs(workdir: str) -> dict[str, dict]:
  """The add_personas jobs of `workdir`, oldest first: name -> its `personas/<name>.json`
  ({"classes", "personas", "method", "data", "fingerprint", "replace", "order", "status", "result"})."""
  directory = os.path.join(workdir, "personas")
  jobs = []
  if os.path.isdir(directory):
    for f in os.listdir(directory):
      if f.endswith(".json"):
        with open(os.path.join(directory, f)) as fh:
          jobs.append((f[:-len(".json")], json.load(fh)))
  return dict(sorted(jobs, key=lambda j: (j[1].get("order", 0), j[0])))


def job_stage(name: str, method: str = "persona_mux") -> str:
  """Where a job's prompt state lives: `prompt/<this>` (and `checkpoints/<this>`)."""
  return f"personas/{name}/{method}"


def _read_split(workdir: str) -> dict:
  return _read_workdir_json(workdir, "split.json")


def persona_texts(workdir: str) -> dict[str, str | None]:
  """Every persona's text description (None when it has none): the run's own
  classes, then those of its add_personas jobs, the newest last."""
  texts = dict(_read_split(workdir).get("personas", {}))
  for entry in persona_jobs(workdir).values():
    texts.update(entry["personas"])
  return texts


def _write_json(path: str, obj) -> None:
  """Writes `obj` to `path` atomically, from process 0 only."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)


def _job_fingerprint(records, method: str, config: dict) -> dict[str, str]:
  """What a job's result depends on, part by part (each a short hash)."""
  import hashlib

  def h(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

  rows = sorted((r.cls, r.text, r.context or "", r.persona or "") for r in records)
  return {"data": h(rows), "method": method, "finetune": h(config["finetune"]), "prompt": h(config["prompt"]),
          "data_config": h({k: config["data"].get(k) for k in
                            ("test_fraction", "max_len", "template", "use_chat_template", "max_per_class_finetune")}),
          "seed": str(config["seed"]), "model_dir": str(config.get("model_dir"))}


def add_personas(config, workdir: str, trunk, tokenizer, records, *, job: str, method: str = "persona_mux",
                 replace: bool = False, source: str | None = None, progress: bool = True, on_step=None,
                 codebook_from: str = "pretrain", mesh=None) -> dict[str, Any]:
  """Stage 2 for personas that arrive after stage 1, from their own data.

  `records` (a path to JSONL/CSV/Parquet records, or `data.Record`s) holds
  only the new personas; every class in it becomes one (`source` names it in
  errors). As in `finetune`, W and b stay frozen and only the new mixtures
  train, all the job's personas together in one compiled job. Each persona is
  split into train and test examples by `data.test_fraction` (a persona with a
  single example only trains), and its test loss is reported.

  The job is registered as `personas/<job>.json` (its classes, text personas,
  config fingerprint, status and results) and its state written to
  `prompt/personas/<job>/<method>`, where `PersonaBank`, `find_persona`,
  `launch/generate.py` and `launch/export.py` find it.

  Raises JobError when a persona name is already taken (by stage 1, the run's
  held-out personas or another job; with `replace`, the new persona takes the
  name over) or when `job` exists with a different config or data: a killed
  job resumes when rerun unchanged, a finished one reports its results.
  """
  check_job_name(job)
  if method not in METHODS:
    raise JobError(f"method {method!r} is unknown; expected one of {', '.join(METHODS)}")
  config = _cfg_dict(config)
  if isinstance(records, (str, os.PathLike)):
    source = source or str(records)
    records, skipped = data_lib.load_records(records)
    if skipped and jax.process_index() == 0:
      print(f"{source}: skipped {dict(skipped)}")
  source = source or "records"
  classes = list(dict.fromkeys(r.cls for r in records))
  if not classes:
    raise data_lib.DataError(f"{source}: no records, so no personas to add")
  split = _read_split(workdir)
  jobs = persona_jobs(workdir)
  path = os.path.join(workdir, "personas", f"{job}.json")
  fingerprint = _job_fingerprint(records, method, config)
  if job in jobs:
    old = jobs[job]
    changed = sorted(k for k in fingerprint if old.get("fingerprint", {}).get(k) != fingerprint[k])
    if changed:
      raise JobError(
          f"job {job!r} ({path}) was run with a different {', '.join(changed)}; pass a new --job name, or "
          f"delete {path} and {os.path.join(workdir, '{prompt,checkpoints}', 'personas', job)} to run it again")
    classes = old["classes"]  # the registered order: mixture rows keep their persona
    if old.get("status") == "done" and old.get("result"):
      return {**old["result"], "stage": job_stage(job, method), "classes": classes, "resumed": "done"}
  else:
    taken = {c: "stage 1" for c in split["pretrain"]}
    taken.update({c: "the run's held-out personas (split.json)" for c in split["finetune"]})
    for other, entry in jobs.items():
      taken.update({c: f"job {other!r}" for c in entry["classes"]})
    clash = [c for c in classes if c in taken]
    if clash and not replace:
      shown = ", ".join(f"{c!r} ({taken[c]})" for c in clash[:20])
      more = f" and {len(clash) - 20} more" if len(clash) > 20 else ""
      raise JobError(f"{source}: {len(clash)} persona name(s) already exist in {workdir}: {shown}{more}; "
                     "rename them, or pass --replace to train new personas under those names")
  personas = {}
  for r in records:
    if r.cls not in personas or (personas[r.cls] is None and r.persona):
      personas[r.cls] = r.persona
  order = jobs[job]["order"] if job in jobs else 1 + max((e.get("order", 0) for e in jobs.values()), default=0)
  entry = {"classes": classes, "personas": personas, "method": method, "data": source, "replace": replace,
           "fingerprint": fingerprint, "order": order, "status": "running"}
  _write_json(path, entry)
  out = _train_new_classes(config, workdir, trunk, records, classes, formatter_for(tokenizer, config),
                           collections.Counter(), job_stage(job, method), method=method,
                           codebook_from=codebook_from, meta={"job": job, "personas": personas},
                           progress=progress, on_step=on_step, mesh=mesh)
  tr, te = class_records(records, classes, config, "max_per_class_finetune")
  tr_counts, te_counts = collections.Counter(r.cls for r in tr), collections.Counter(r.cls for r in te)
  finite = lambda x: None if x is None or not np.isfinite(x) else float(x)  # no test examples: None
  result = {"initial_test_loss": finite(out["initial_test_loss"]), "test_loss": finite(out["test_loss"]),
            "per_persona": {c: {"train_examples": tr_counts[c], "test_examples": te_counts[c],
                                "initial_test_loss": finite(out["initial_per_class"].get(c)),
                                "test_loss": finite(out["per_class"].get(c))} for c in classes}}
  _write_json(path, {**entry, "status": "done", "result": result})
  return {**out, **result}


# --- LoRA baseline --------------------------------------------------------------------------


def train_lora(config, workdir: str, trunk, tokenizer, records=None, *, progress: bool = True, on_step=None,
               mesh=None) -> dict[str, Any]:
  """The LoRA baseline: adapters on the frozen trunk, trained as in the paper on
  the pretraining classes' train split plus the finetuning classes' train
  split (text personas in the prompt, no soft tokens). Evaluated on the
  finetuning classes' test split, the same examples stage 2 uses. Writes
  `prompt/lora` (adapters and their `lora` config); the adapters are
  detached from `trunk` on return (`load_lora` puts them back).
  """
  config, records, split, fmt, counts = _stage_inputs(config, workdir, tokenizer, records)
  pre_tr, _ = make_examples(records, split.pretrain, fmt, config, "max_per_class_pretrain", counts)
  fin_tr, te = make_examples(records, split.finetune, fmt, config, "max_per_class_finetune", counts)
  lc = config["lora"]
  lcfg = lora_lib.LoRAConfig.from_config(lc)
  if lc["batch_size"] % _batch_unit(mesh):
    raise ValueError(f"lora.batch_size={lc['batch_size']} must be a multiple of {_batch_unit(mesh)} "
                     "(processes x data x fsdp mesh axes)")
  buckets = data_lib.default_buckets(config["data"]["max_len"])
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  src = data_lib.ShuffledBatches(pre_tr + fin_tr, lc["batch_size"], seed=config["seed"], buckets=buckets,
                                 pad_id=pad, shard=jax.process_index(), num_shards=jax.process_count())
  steps = lc.get("steps") or lc["epochs"] * src.steps_per_epoch()
  test_batches = _eval_batches(te, config) if te else []
  with lora_lib.attached(trunk, lcfg, seed=config["seed"]):
    initial = train.evaluate(trunk, None, test_batches) if test_batches else {"loss": float("nan")}
    eval_fn = (lambda: _summary(train.evaluate(trunk, None, test_batches), split.finetune)) \
        if test_batches else None
    phase = train.Phase("lora", lora_lib.LoRAParam, src, steps, train.OptimConfig.from_config(lc))
    result = train.run_phases(trunk, None, [phase], workdir=workdir, checkpoint_every=lc["checkpoint_every"],
                              eval_fn=eval_fn, eval_every=lc["eval_every"], stage="lora", progress=progress,
                              on_step=on_step, mesh=mesh)
    final = train.evaluate(trunk, None, test_batches) if test_batches else initial
    save_prompt(workdir, "lora", Part(trunk, lora_lib.LoRAParam),
                {"method": "lora", "lora": lcfg.to_dict(), "classes": split.finetune, "test_loss": final["loss"],
                 "params": lora_lib.count(trunk.config, lcfg)}, key="adapters")
  return {"test_loss": final["loss"], "initial_test_loss": initial["loss"], "train_examples": len(src.examples),
          "lora": lcfg, "test_batches": test_batches, **result}


def load_lora(workdir: str, trunk) -> dict:
  """Attaches the trained LoRA adapters of `workdir` to `trunk`; returns their meta.
  Take them off with `persomux.models.lora.detach(trunk)`."""
  directory = os.path.join(workdir, "prompt", "lora")
  ck = Checkpointer(directory, keep=1)
  if ck.latest_step() is None:
    raise FileNotFoundError(f"{directory}: no LoRA adapters; run the LoRA baseline first")
  meta = ck.read_meta()
  lora_lib.attach(trunk, lora_lib.LoRAConfig.from_config(meta["lora"]))
  ck.restore({"adapters": Part(trunk, lora_lib.LoRAParam)})
  ck.close()
  return meta
