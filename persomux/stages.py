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
import dataclasses
import hashlib
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
from persomux import run_config, train
from persomux.checkpoint import Checkpointer, Part
from persomux.models import lora as lora_lib

METHODS = ("persona_mux", "soft_prompt", "random_codebook")
_TRAINS = {"persona_mux": prompts_lib.Mixtures, "random_codebook": prompts_lib.Mixtures,
           "soft_prompt": prompts_lib.ClassPrompts}


def save_run(config, workdir: str, *, allow_config_change: bool = False) -> None:
  """Writes the run's config to `run.json`. A workdir whose `run.json` holds another
  config (any result-affecting field outside `eval`) raises `train.ConfigChanged`
  naming the changed fields, unless `allow_config_change`: a run must not resume
  under a config other than its own without saying so."""
  c = run_config.view(config)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "run.json")
  if os.path.isfile(path):
    sections = [f.name for f in dataclasses.fields(run_config.Run) if f.name not in ("eval", "extras")]
    changed = run_config.changes(run_config.view(load_run(workdir)).flat(sections), c.flat(sections))
    if changed and not allow_config_change:
      raise train.ConfigChanged(
          f"{path}: this run was started with another config; changed: {'; '.join(changed)}. Use a new "
          "--workdir, or pass --allow_config_change to go on with the new config")
  _write_json(path, c.to_dict(), indent=2)


def _read_workdir_json(workdir: str, name: str) -> dict:
  path = os.path.join(workdir, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: missing; run stage 1 (launch/pretrain.py) with this --workdir first")
  with open(path) as f:
    return json.load(f)


def load_run(workdir: str) -> dict:
  """The config a run was started with (`run.json`), as written; `run_config.view` reads it."""
  return _read_workdir_json(workdir, "run.json")


def load_trunk(config, mesh=None):
  from persomux.models.params import load_model

  c = run_config.view(config)
  if not c.model_dir:
    raise ValueError("config.model_dir is empty; set it to a local Hugging Face checkpoint directory, "
                     "a .gguf file or a shipped model name")
  # An empty dtype (the default) means the checkpoint's own.
  return load_model(c.model_dir, dtype=c.dtype or None, remat=c.remat, mesh=mesh)


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
    c = run_config.view(config)
    pre, fine = data_lib.split_classes(records, c.data.finetune_fraction, c.seed)
    personas = {}
    for r in records:
      if r.persona and r.cls not in personas:
        personas[r.cls] = r.persona
    split = cls(pre, fine, personas)
    if path:  # every process computes the same split; process 0 writes it
      _write_json(path, {"pretrain": pre, "finetune": fine, "personas": personas})
    return split


def class_records(records, classes: list[str], config, cap_key: str) -> tuple[list, list]:
  """(train, test) records of `classes`: capped per class (`data.<cap_key>`, e.g.
  "max_per_class_finetune"), then split per class (seeded)."""
  c = run_config.view(config)
  rs = data_lib.select_classes(records, classes, source=c.data.path or "data")
  rs = data_lib.cap_per_class(rs, getattr(c.data, cap_key), seed=c.seed)
  return data_lib.split_train_test(rs, c.data.test_fraction, seed=c.seed)


def make_examples(records, classes: list[str], formatter, config, cap_key: str, counts) -> tuple[list, list]:
  """(train, test) examples of `classes`, ids in the order of `classes`."""
  c = run_config.view(config)
  vocab = data_lib.ClassVocab(classes)
  tr, te = class_records(records, classes, c, cap_key)
  enc = lambda x: data_lib.encode(x, formatter, vocab, c.data.max_len, counts)
  return enc(tr), enc(te)


def formatter_for(tokenizer, config) -> data_lib.PromptFormatter:
  c = run_config.view(config)
  return data_lib.PromptFormatter(tokenizer, c.data.template, c.data.use_chat_template)


def eval_batches(examples, config) -> list[dict]:
  """Test batches of `examples`: `pretrain.micro_batch_size` rows (else `pretrain.batch_size`)."""
  c = run_config.view(config)
  rows = c.pretrain.micro_batch_size or c.pretrain.batch_size
  buckets = data_lib.buckets_for(examples, c.data.max_len)
  return data_lib.ShuffledBatches(examples, rows, buckets=buckets, shuffle=False).all_batches()


def train_batches(examples, c: run_config.Run, section: str, tokenizer, mesh) -> data_lib.ShuffledBatches:
  """The shuffled training batches of a stage from its config section (`pretrain`, `finetune`,
  `lora`): `batch_size` examples per update (0: all of them), run as micro-batches of
  `micro_batch_size` rows. A full batch is padded with empty rows to fit the mesh; otherwise
  the rows of one forward pass must be a multiple of processes x data x fsdp."""
  sc = getattr(c, section)
  unit = _batch_unit(mesh)
  size = sc.batch_size or -(-len(examples) // unit) * unit
  micro = sc.micro_batch_size if 0 < sc.micro_batch_size < size else 0
  if (micro or size) % unit:
    field = "micro_batch_size" if micro else "batch_size"
    raise ValueError(f"{section}.{field}={micro or size} must be a multiple of {unit} "
                     "(processes x data x fsdp mesh axes)")
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  return data_lib.ShuffledBatches(examples, size, seed=c.seed, buckets=data_lib.buckets_for(examples, c.data.max_len),
                                  pad_id=pad, shard=jax.process_index(), num_shards=jax.process_count(),
                                  micro_batch_size=micro)


def stage_config(c: run_config.Run, section: str, examples, *, sections=("data", "prompt"), exclude=()) -> dict:
  """What a stage's result depends on, field by field (`run_config.Run.flat` over `sections`
  and `section`, less `exclude`), with a hash of its training examples: a resume compares
  it with the checkpoint's (`train.run_phases(config=)`)."""
  h = hashlib.sha256()
  for e in examples:
    for part in (e.prefix, e.suffix, e.target, np.asarray([e.class_id, -1], np.int32)):
      h.update(np.ascontiguousarray(part, np.int32).tobytes())
      h.update(b"|")
  flat = {k: v for k, v in c.flat((*sections, section)).items() if k not in exclude}
  return {**flat, "train_examples": f"{len(examples)} examples, {h.hexdigest()[:16]}"}


# --- prompt state on disk ---------------------------------------------------------------


def embedding_std(trunk) -> float:
  """Standard deviation of the trunk's input embeddings as `Trunk.embed` returns
  them (Gemma's sqrt(d) scale included)."""
  table = trunk.embed_tokens[...]
  return float(jnp.std(table.astype(jnp.float32))) * trunk.config.embed_scale


def init_std(trunk, pc: run_config.Prompt) -> float:
  """`prompt.init_std`, where 0 means "the trunk's own embedding scale" (`embedding_std`)."""
  return pc.init_std if pc.init_std > 0 else embedding_std(trunk)


def build_prompt(method: str, num_classes: int, d_model: int, pc, seed: int, std: float | None = None):
  """A fresh prompt module of the `prompt` section `pc` (a `run_config.Prompt`, or its dict
  as prompt metadata keeps it); `std` (default `pc.init_std`) is the scale of its random init."""
  pc = pc if isinstance(pc, run_config.Prompt) else run_config.view({"prompt": pc}).prompt
  rngs = nnx.Rngs(seed)
  std = pc.init_std if std is None else std
  sizes = dict(num_codes=pc.num_codes, code_tokens=pc.code_tokens, bias_tokens=pc.bias_tokens,
               init_std=std, rngs=rngs)
  if method == "persona_mux":
    return prompts_lib.PersonaMux(num_classes, d_model, **sizes)
  if method == "random_codebook":
    return prompts_lib.RandomCodebook(num_classes, d_model, **sizes)
  if method == "soft_prompt":
    return prompts_lib.SoftPrompt(num_classes, d_model, num_tokens=pc.soft_prompt_tokens,
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
  """`(typed config, records, split, formatter, truncation counts)` shared by every stage."""
  c = run_config.view(config)
  if records is None:
    records, _ = data_lib.load_records(c.data.path)
  split = Split.make(records, c, workdir)
  return c, records, split, formatter_for(tokenizer, c), collections.Counter()


def pretrain(config, workdir: str, trunk, tokenizer, records=None, *, method: str = "persona_mux",
             progress: bool = True, on_step=None, mesh=None, allow_config_change: bool = False) -> dict[str, Any]:
  """Stage 1 on the pretraining classes; writes `prompt/pretrain` (or `prompt/pretrain_<method>`).

  PersonaMux: a bias-only warmup (`pretrain.warmup_epochs`, m_i = 0, W
  frozen), then W, b and every m_i jointly for `pretrain.epochs`. A resume
  under another config raises `train.ConfigChanged` unless `allow_config_change`.
  """
  c, records, split, fmt, counts = _stage_inputs(config, workdir, tokenizer, records)
  tr, te = make_examples(records, split.pretrain, fmt, c, "max_per_class_pretrain", counts)
  prompt = build_prompt(method, len(split.pretrain), trunk.config.d_model, c.prompt, c.seed,
                        init_std(trunk, c.prompt))
  src = train_batches(tr, c, "pretrain", tokenizer, mesh)
  spe = src.steps_per_epoch()
  optim = c.pretrain.optim()
  phases = []
  if method in ("persona_mux", "random_codebook") and c.pretrain.warmup_epochs:
    phases.append(train.Phase("warmup", prompts_lib.Bias, src, c.pretrain.warmup_epochs * spe, optim))
  phases.append(train.Phase("joint", prompts_lib.PromptParam, src, c.pretrain.epochs * spe, optim))
  test_batches = eval_batches(te, c) if te else []
  evaluate = lambda: train.evaluate(trunk, prompt, test_batches, loss_chunk=c.loss_chunk)
  eval_fn = (lambda: _summary(evaluate(), split.pretrain)) if test_batches else None
  stage = "pretrain" if method == "persona_mux" else f"pretrain_{method}"
  result = train.run_phases(trunk, prompt, phases, workdir=workdir, checkpoint_every=c.pretrain.checkpoint_every,
                            eval_fn=eval_fn, eval_every=c.pretrain.eval_every, stage=stage, progress=progress,
                            on_step=on_step, mesh=mesh, loss_chunk=c.loss_chunk,
                            config=stage_config(c, "pretrain", tr), allow_config_change=allow_config_change)
  final = evaluate() if test_batches else {"loss": float("nan")}
  save_prompt(workdir, stage, prompt, {"method": method, "classes": split.pretrain,
                                      "prompt": dataclasses.asdict(c.prompt), "test_loss": final["loss"]})
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
             progress: bool = True, on_step=None, codebook_from: str = "pretrain", mesh=None,
             allow_config_change: bool = False) -> dict[str, Any]:
  """Stage 2 on the held-out classes: only their per-class parameters train.

  persona_mux: W and b from stage 1, new m_i. random_codebook: b from stage 1,
  W replaced by a fixed random codebook of the same size and scale (the
  paper's ablation). soft_prompt: independent per-class prompts. All new
  classes train together, full batch by default (`finetune.batch_size=0`;
  `finetune.micro_batch_size` bounds the rows of each forward pass).
  Writes `prompt/finetune_<method>`, whose metadata keeps each class's test
  loss before and after (`initial_per_class`, `per_class`).
  """
  c, records, split, fmt, counts = _stage_inputs(config, workdir, tokenizer, records)
  data_lib.check_disjoint(split.pretrain, split.finetune, source=os.path.join(workdir, "split.json"))
  return _train_new_classes(c, workdir, trunk, tokenizer, records, split.finetune, fmt, counts,
                            f"finetune_{method}", method=method, codebook_from=codebook_from, meta={},
                            progress=progress, on_step=on_step, mesh=mesh, allow_config_change=allow_config_change)


def _train_new_classes(c: run_config.Run, workdir: str, trunk, tokenizer, records, classes: list[str], fmt, counts,
                       stage: str, *, method: str, codebook_from: str, meta: dict, progress: bool, on_step, mesh,
                       allow_config_change: bool, exclude=()) -> dict[str, Any]:
  """Stage 2 for `classes`: their per-class parameters train on their train
  split, everything else stays frozen; writes `prompt/<stage>`."""
  tr, te = make_examples(records, classes, fmt, c, "max_per_class_finetune", counts)
  d = trunk.config.d_model
  prompt = build_prompt(method, len(classes), d, c.prompt, c.seed + 1, init_std(trunk, c.prompt))
  if method in ("persona_mux", "random_codebook"):
    base, _ = load_prompt(workdir, codebook_from, d)
    prompt.bias[...] = base.bias[...]
    if method == "persona_mux":
      prompt.codebook[...] = base.codebook[...]
    else:
      scale = float(np.std(np.asarray(base.codebook[...])))
      prompt.codebook[...] = scale * jax.random.normal(jax.random.key(c.seed + 2), prompt.codebook.shape)
  src = train_batches(tr, c, "finetune", tokenizer, mesh)
  test_batches = eval_batches(te, c) if te else []
  evaluate = lambda: train.evaluate(trunk, prompt, test_batches, loss_chunk=c.loss_chunk)
  initial = evaluate() if test_batches else {"loss": float("nan"), "per_class": {}}
  eval_fn = (lambda: _summary(evaluate(), classes)) if test_batches else None
  phase = train.Phase("finetune", _TRAINS[method], src, c.finetune.steps, c.finetune.optim())
  result = train.run_phases(trunk, prompt, [phase], workdir=workdir, checkpoint_every=c.finetune.checkpoint_every,
                            eval_fn=eval_fn, eval_every=c.finetune.eval_every, stage=stage, progress=progress,
                            on_step=on_step, mesh=mesh, loss_chunk=c.loss_chunk,
                            config=stage_config(c, "finetune", tr, exclude=exclude),
                            allow_config_change=allow_config_change)
  final = evaluate() if test_batches else initial
  per_class = {classes[i]: v for i, v in final["per_class"].items()}
  initial_per_class = {classes[i]: v for i, v in initial["per_class"].items()}
  save_prompt(workdir, stage, prompt, {"method": method, "classes": classes, "prompt": dataclasses.asdict(c.prompt),
                                      "test_loss": final["loss"], "initial_test_loss": initial["loss"],
                                      "per_class": per_class, "initial_per_class": initial_per_class, **meta})
  return {"prompt": prompt, "test_loss": final["loss"], "initial_test_loss": initial["loss"],
          "per_class": per_class, "initial_per_class": initial_per_class,
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


def _write_json(path: str, obj, indent: int = 1) -> None:
  """Writes `obj` to `path` atomically, from process 0 only."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=indent)
  os.replace(path + ".tmp", path)


def _job_fingerprint(records, method: str, c: run_config.Run) -> dict[str, str]:
  """What a job's result depends on, part by part (each a short hash). The
  `finetune` part leaves out `micro_batch_size` (memory only; it also keeps jobs
  registered before it existed from seeming changed)."""

  def h(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

  rows = sorted((r.cls, r.text, r.context or "", r.persona or "") for r in records)
  finetune = {k: v for k, v in dataclasses.asdict(c.finetune).items() if k != "micro_batch_size"}
  data = dataclasses.asdict(c.data)
  return {"data": h(rows), "method": method, "finetune": h(finetune), "prompt": h(dataclasses.asdict(c.prompt)),
          "data_config": h({k: data[k] for k in
                            ("test_fraction", "max_len", "template", "use_chat_template", "max_per_class_finetune")}),
          "seed": str(c.seed), "model_dir": str(c.model_dir)}


def add_personas(config, workdir: str, trunk, tokenizer, records, *, job: str, method: str = "persona_mux",
                 replace: bool = False, source: str | None = None, progress: bool = True, on_step=None,
                 codebook_from: str = "pretrain", mesh=None, allow_config_change: bool = False) -> dict[str, Any]:
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
  c = run_config.view(config)
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
  fingerprint = _job_fingerprint(records, method, c)
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
  # The job's records, not data.path, are its data (their examples' hash is in the stage config).
  out = _train_new_classes(c, workdir, trunk, tokenizer, records, classes, formatter_for(tokenizer, c),
                           collections.Counter(), job_stage(job, method), method=method,
                           codebook_from=codebook_from, meta={"job": job, "personas": personas},
                           progress=progress, on_step=on_step, mesh=mesh, allow_config_change=allow_config_change,
                           exclude=("data.path",))
  tr, te = class_records(records, classes, c, "max_per_class_finetune")
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
               mesh=None, allow_config_change: bool = False) -> dict[str, Any]:
  """The LoRA baseline: adapters on the frozen trunk, trained as in the paper on
  the pretraining classes' train split plus the finetuning classes' train
  split (text personas in the prompt, no soft tokens). Evaluated on the
  finetuning classes' test split, the same examples stage 2 uses. Writes
  `prompt/lora` (adapters and their `lora` config); the adapters are
  detached from `trunk` on return (`load_lora` puts them back).
  """
  c, records, split, fmt, counts = _stage_inputs(config, workdir, tokenizer, records)
  pre_tr, _ = make_examples(records, split.pretrain, fmt, c, "max_per_class_pretrain", counts)
  fin_tr, te = make_examples(records, split.finetune, fmt, c, "max_per_class_finetune", counts)
  lcfg = c.lora.adapters()
  src = train_batches(pre_tr + fin_tr, c, "lora", tokenizer, mesh)
  steps = c.lora.steps or c.lora.epochs * src.steps_per_epoch()
  test_batches = eval_batches(te, c) if te else []
  evaluate = lambda: train.evaluate(trunk, None, test_batches, loss_chunk=c.loss_chunk)
  with lora_lib.attached(trunk, lcfg, seed=c.seed):
    initial = evaluate() if test_batches else {"loss": float("nan")}
    eval_fn = (lambda: _summary(evaluate(), split.finetune)) if test_batches else None
    phase = train.Phase("lora", lora_lib.LoRAParam, src, steps, c.lora.optim())
    result = train.run_phases(trunk, None, [phase], workdir=workdir, checkpoint_every=c.lora.checkpoint_every,
                              eval_fn=eval_fn, eval_every=c.lora.eval_every, stage="lora", progress=progress,
                              on_step=on_step, mesh=mesh, loss_chunk=c.loss_chunk,
                              config=stage_config(c, "lora", src.examples, sections=("data",)),
                              allow_config_change=allow_config_change)
    final = evaluate() if test_batches else initial
    save_prompt(workdir, "lora", Part(trunk, lora_lib.LoRAParam),
                {"method": "lora", "lora": lcfg.to_dict(), "classes": split.finetune, "test_loss": final["loss"],
                 "params": lora_lib.count(trunk.config, lcfg)}, key="adapters")
  return {"test_loss": final["loss"], "initial_test_loss": initial["loss"], "train_examples": len(src.examples),
          "lora": lcfg, "test_batches": test_batches, **result}


def evaluation_stages(config, workdir: str, trunk, tokenizer, records=None, *, methods, progress: bool = True,
                      mesh=None, allow_config_change: bool = False, log=print) -> None:
  """Trains what the evaluation of `methods` needs and `workdir` lacks (each stage
  resumes): stage 2 of every fine-tuned method among them, the random-codebook
  ablation with Persona-Mux (the loss-improvement table compares the two), and
  the LoRA baseline. Stage 1 must exist. `persomux.evaluation` then only measures."""
  for m in METHODS:
    if m in methods or (m == "random_codebook" and "persona_mux" in methods):
      log(f"[eval] stage 2: {m}")
      finetune(config, workdir, trunk, tokenizer, records, method=m, progress=progress, mesh=mesh,
               allow_config_change=allow_config_change)
  if "lora" in methods:
    log("[eval] LoRA baseline")
    train_lora(config, workdir, trunk, tokenizer, records, progress=progress, mesh=mesh,
               allow_config_change=allow_config_change)


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
