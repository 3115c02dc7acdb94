"""Typed views of a run's config: one frozen dataclass per section, built by `view`.

A run's config is an ml_collections `ConfigDict` (configs/*.py, `--config.x=`
overrides) or the plain dict of its `run.json`. Library code reads it only
through `view(config)`, a `Run` whose sections are `Data`, `Prompt`,
`Pretrain`, `Finetune`, `Lora` and `Eval`.

Defaults live in configs/base.py: the config is read over them, so a
`run.json` written before a key existed still loads (the key takes its
default), while a key no section knows is an error that names the section,
the key and the known keys. Launch-owned entries (the demo's corpus and toy
trunk) pass through untyped in `Run.extras`; the launch reads them with
`section`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# Top-level entries the library does not read; launch/demo.py does (its population and toy trunk).
LAUNCH_KEYS = ("corpus_kind", "corpus", "base_model")
# Fields that change memory use or logging, never what a run computes (up to float rounding):
# they may change when a run resumes.
RESULT_NEUTRAL = ("mesh", "remat", "loss_chunk", "micro_batch_size", "checkpoint_every", "eval_every")


class ConfigError(ValueError):
  """A config entry that no section knows, or one of the wrong type."""


def _coerce(value, hint: str, where: str):
  """`value` as the field's annotated type (`int`, `float`, `str`, `bool`, `float | None`, `bool | str`);
  other annotations (e.g. `tuple[str, ...]`) pass the value through."""
  kinds = [k.strip() for k in hint.split("|")]
  if not set(kinds) <= {"int", "float", "str", "bool", "None"}:
    return value
  if value is None and "None" in kinds:
    return None
  if isinstance(value, bool) and "bool" in kinds:
    return value
  for kind in kinds:
    if kind == "int" and isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
      return int(value)
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if kind == "str" and isinstance(value, str):
      return value
  raise ConfigError(f"config {where} is {value!r}; expected {hint}")


def section(cls, values: Mapping | None, name: str, defaults: Mapping | None = None):
  """`cls` (a frozen dataclass) from `values` over `defaults`.

  Raises ConfigError for a key `cls` has no field for (naming the section,
  the key and the known keys), for a field neither gives, and for a value of
  the wrong type.
  """
  if values is not None and not isinstance(values, Mapping):
    raise ConfigError(f"config section {name!r} is {values!r}; expected a mapping of its keys")
  values = dict(values or {})
  defaults = dict(defaults or {})
  fields = [f for f in dataclasses.fields(cls) if f.init]
  known = [f.name for f in fields]
  unknown = sorted(set(values) - set(known))
  if unknown:
    raise ConfigError(f"config section {name!r}: unknown key {unknown[0]!r}"
                      + (f" (and {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else "")
                      + f"; known keys: {', '.join(known)}")
  out = {}
  for f in fields:
    where = f"{name}.{f.name}" if name else f.name
    if f.name in values:
      v = values[f.name]
    elif f.name in defaults:
      v = defaults[f.name]
    elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
      continue
    else:
      raise ConfigError(f"config section {name!r}: key {f.name!r} is missing and has no default")
    nested = globals().get(f.type)  # annotations are strings (PEP 563): a section's class name
    if dataclasses.is_dataclass(nested):
      out[f.name] = v if isinstance(v, nested) else section(nested, _plain(v), where, _plain(defaults.get(f.name)))
    else:
      out[f.name] = _coerce(_plain(v), f.type, where)
  return cls(**out)


def _plain(v):
  """ConfigDicts (and mappings) as plain dicts; anything else unchanged."""
  if hasattr(v, "to_dict"):
    return v.to_dict()
  if isinstance(v, Mapping):
    return dict(v)
  return v


# --- the sections ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Data:
  path: str
  finetune_fraction: float
  test_fraction: float
  max_per_class_pretrain: int
  max_per_class_finetune: int
  max_len: int
  template: str
  use_chat_template: bool | str


@dataclasses.dataclass(frozen=True)
class Prompt:
  num_codes: int
  code_tokens: int
  bias_tokens: int
  soft_prompt_tokens: int
  init_std: float


@dataclasses.dataclass(frozen=True)
class _Loop:
  """What every training section has: its batches, optimizer and checkpoint/eval cadence."""

  batch_size: int  # examples per update (0: the whole training set, in finetune)
  micro_batch_size: int  # rows per forward pass; an update sums the gradients of its micro-batches (0: one)
  learning_rate: float
  schedule: str
  warmup_steps: int
  clip_norm: float | None
  adam_eps: float
  checkpoint_every: int
  eval_every: int

  def optim(self):
    """The section's `train.OptimConfig`."""
    from persomux import train

    names = {f.name for f in dataclasses.fields(train.OptimConfig)}
    return train.OptimConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


@dataclasses.dataclass(frozen=True)
class Pretrain(_Loop):
  warmup_epochs: int
  epochs: int
  mixture_lr_scale: float


@dataclasses.dataclass(frozen=True)
class Finetune(_Loop):
  steps: int


@dataclasses.dataclass(frozen=True)
class Lora(_Loop):
  rank: int
  alpha: float
  targets: str
  epochs: int
  steps: int

  def adapters(self):
    """The section's `lora.LoRAConfig`."""
    from persomux.models import lora

    return lora.LoRAConfig.from_config({"rank": self.rank, "alpha": self.alpha, "targets": self.targets})


@dataclasses.dataclass(frozen=True)
class Eval:
  methods: str
  bias_scales: str
  icl_shots: int
  generation_classes: int
  prompts_per_class: int
  max_new_tokens: int
  temperature: float
  top_k: int | None
  batch_size: int
  discrimination: str
  discrimination_trials: int
  judge_max_len: int
  seed: int

  @property
  def method_list(self) -> list[str]:
    return _csv(self.methods)

  @property
  def scale_list(self) -> list[float]:
    return [float(s) for s in _csv(self.bias_scales)]


def _csv(v) -> list[str]:
  if isinstance(v, (list, tuple)):
    return [str(x) for x in v]
  return [x.strip() for x in str(v).split(",") if x.strip()]


@dataclasses.dataclass(frozen=True)
class Run:
  model_dir: str
  dtype: str | None  # "" or None: the checkpoint's own
  remat: bool | str
  seed: int
  mesh: str
  loss_chunk: int  # target tokens whose logits are computed at once
  data: Data
  prompt: Prompt
  pretrain: Pretrain
  finetune: Finetune
  lora: Lora
  eval: Eval
  extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # LAUNCH_KEYS entries, untyped

  def to_dict(self) -> dict:
    """The plain nested dict (`run.json`), launch entries included."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extras"}
    out = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in out.items()}
    return {**out, **{k: _plain(v) for k, v in self.extras.items()}}

  def flat(self, sections=None) -> dict[str, Any]:
    """`{"data.max_len": 96, "seed": 0, ...}` over the top-level fields and `sections`
    (default: all), for comparing two configs field by field."""
    out = {}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if f.name == "extras":
        continue
      if dataclasses.is_dataclass(v):
        if sections is None or f.name in sections:
          out.update({f"{f.name}.{k}": x for k, x in dataclasses.asdict(v).items()})
      else:
        out[f.name] = v
    return out


def defaults() -> dict:
  """configs/base.py as a plain dict."""
  from configs import base

  return base.get_config().to_dict()


def view(config) -> Run:
  """The typed view of `config` (a ConfigDict, a dict such as a `run.json`, or a `Run`)."""
  if isinstance(config, Run):
    return config
  given = _plain(config)
  if not isinstance(given, dict):
    raise ConfigError(f"a run config is a mapping of sections; got {type(config).__name__}")
  extras = {k: given.pop(k) for k in LAUNCH_KEYS if k in given}
  fields = [f.name for f in dataclasses.fields(Run) if f.name != "extras"]
  unknown = sorted(set(given) - set(fields))
  if unknown:
    raise ConfigError(f"config: unknown top-level key {unknown[0]!r}; known keys: {', '.join(fields)} "
                      f"(and, for launch/demo.py, {', '.join(LAUNCH_KEYS)})")
  run = section(Run, given, "", {k: v for k, v in defaults().items() if k not in LAUNCH_KEYS})
  return dataclasses.replace(run, extras=extras)


def changes(old: Mapping[str, Any], new: Mapping[str, Any], ignore=RESULT_NEUTRAL) -> list[str]:
  """`["pretrain.learning_rate: 0.001 -> 0.01", ...]`: the fields of two flat configs
  (`Run.flat`) that differ, leaving out `ignore` (bare field names)."""
  out = []
  for k in sorted(set(old) | set(new)):
    if k.rsplit(".", 1)[-1] in ignore:
      continue
    if k not in old or k not in new:  # a field one side predates: nothing to compare
      continue
    if old[k] != new[k]:
      out.append(f"{k}: {old[k]!r} -> {new[k]!r}")
  return out
