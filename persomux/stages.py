"""Stage 1 and stage 2 as resumable runs over a workdir.

Workdir layout:
  run.json                  the config of the run (trunk path, data, sizes)
  split.json                pretraining / finetuning classes and their text personas
  checkpoints/<stage>/      orbax training checkpoints (prompt, optimizer, position)
  prompt/<name>/            final prompt state of a stage (orbax) with its metadata
  metrics.jsonl             one JSON object per train step / evaluation
"""

from __future__ import annotations

import collections
import json
import os
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


def load_run(workdir: str) -> dict:
  path = os.path.join(workdir, "run.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: missing; run launch/pretrain.py with this --workdir first")
  with open(path) as f:
    return json.load(f)


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
    if path and jax.process_index() == 0:  # every process computes the same split
      os.makedirs(workdir, exist_ok=True)
      with open(path + ".tmp", "w") as f:
        json.dump({"pretrain": pre, "finetune": fine, "personas": personas}, f, indent=1)
      os.replace(path + ".tmp", path)
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
  (stage 2 first, then stage 1). Raises KeyError listing known personas."""
  names = [f"finetune_{method}", "pretrain" if method == "persona_mux" else f"pretrain_{method}"]
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
  tr, te = make_examples(records, split.finetune, fmt, config, "max_per_class_finetune", counts)
  pc, fc = config["prompt"], config["finetune"]
  d = trunk.config.d_model
  prompt = build_prompt(method, len(split.finetune), d, pc, config["seed"] + 1, init_std(trunk, pc))
  if method in ("persona_mux", "random_codebook"):
    base, _ = load_prompt(workdir, codebook_from, d)
    prompt.bias[...] = base.bias[...]
    if method == "persona_mux":
      prompt.codebook[...] = base.codebook[...]
    else:
      scale = float(np.std(np.asarray(base.codebook[...])))
      prompt.codebook[...] = scale * jax.random.normal(jax.random.key(config["seed"] + 2), prompt.codebook.shape)
  buckets = data_lib.default_buckets(config["data"]["max_len"])
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  bsz = fc["batch_size"] or len(tr)
  # Full batch: round up (empty rows) so every process and data shard gets equal rows.
  unit = _batch_unit(mesh)
  bsz = -(-bsz // unit) * unit
  src = data_lib.ShuffledBatches(tr, bsz, seed=config["seed"], buckets=buckets, pad_id=pad,
                                 shard=jax.process_index(), num_shards=jax.process_count())
  test_batches = _eval_batches(te, config) if te else []
  initial = train.evaluate(trunk, prompt, test_batches) if test_batches else {"loss": float("nan"),
                                                                              "per_class": {}}
  eval_fn = (lambda: _summary(train.evaluate(trunk, prompt, test_batches), split.finetune)) \
      if test_batches else None
  phase = train.Phase("finetune", _TRAINS[method], src, fc["steps"], train.OptimConfig.from_config(fc))
  stage = f"finetune_{method}"
  result = train.run_phases(trunk, prompt, [phase], workdir=workdir, checkpoint_every=fc["checkpoint_every"],
                            eval_fn=eval_fn, eval_every=fc["eval_every"], stage=stage, progress=progress,
                            on_step=on_step, mesh=mesh)
  final = train.evaluate(trunk, prompt, test_batches) if test_batches else initial
  save_prompt(workdir, stage, prompt, {"method": method, "classes": split.finetune, "prompt": pc,
                                      "test_loss": final["loss"]})
  names = split.finetune
  return {"prompt": prompt, "test_loss": final["loss"], "initial_test_loss": initial["loss"],
          "per_class": {names[c]: v for c, v in final["per_class"].items()},
          "initial_per_class": {names[c]: v for c, v in initial["per_class"].items()},
          "test_batches": test_batches, "classes": names, "truncated": dict(counts), **result}


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
