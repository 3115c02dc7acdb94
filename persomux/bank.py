"""The persona bank: every Persona-Mux persona of a run, over one codebook and bias.

A run's personas come from three places, all sharing stage 1's codebook W and
bias b:

- stage 1's classes (`prompt/pretrain`);
- the held-out classes of stage 2 (`prompt/finetune_persona_mux`), when it ran;
- every `add_personas` job (`personas/<job>.json`, `prompt/personas/<job>/persona_mux`),
  oldest first; a job run with `replace` takes over the names it reuses.

Each persona is 64 numbers (its mixtures m), a text persona (or None) and the
job it came from. `PersonaBank.soft_prompts(names, bias_scales)` gives what
`persomux.generate` takes for any mix of personas, one per row:

    bank = PersonaBank.load("runs/demo")
    soft = bank.soft_prompts(["persona_0003", "new_npc_7"], [1.0, 0.5])
    persomux.generate(trunk, tokenizer, prompts, max_new_tokens=40, soft_prompts=soft)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from persomux import prompts as prompts_lib
from persomux import sampling, stages

STAGE1, HELD_OUT = "stage 1", "held-out"


@dataclasses.dataclass(frozen=True)
class Persona:
  """One persona of the bank."""
  name: str
  mixtures: np.ndarray  # [n] float32
  text: str | None  # its text persona, placed before its soft tokens
  job: str  # "stage 1", "held-out" or the add_personas job's name


class PersonaBank:
  """Personas of one run over a shared codebook `[n, k, d]` and bias `[l, d]`."""

  def __init__(self, codebook: np.ndarray, bias: np.ndarray, personas: Sequence[Persona],
               prompt_config: dict | None = None):
    self.codebook = np.asarray(codebook, np.float32)
    self.bias = np.asarray(bias, np.float32)
    self.prompt_config = dict(prompt_config or {})
    self._personas = {p.name: p for p in personas}
    n = self.codebook.shape[0]
    for p in self._personas.values():
      if p.mixtures.shape != (n,):
        raise ValueError(f"persona {p.name!r} ({p.job}): mixtures of shape {p.mixtures.shape}; expected ({n},)")
    self._module = None

  @classmethod
  def load(cls, workdir: str) -> "PersonaBank":
    """Gathers every Persona-Mux persona of the run in `workdir` (see the module doc)."""
    from persomux import run_config
    from persomux.models.params import load_config

    d = load_config(run_config.view(stages.load_run(workdir)).model_dir).d_model
    pre_dir = os.path.join(workdir, "prompt", "pretrain")
    if not os.path.isdir(pre_dir):
      raise FileNotFoundError(f"{pre_dir}: no stage-1 codebook; run launch/pretrain.py with this workdir first")
    texts = stages.persona_texts(workdir)
    base, meta = stages.load_prompt(workdir, "pretrain", d)
    codebook, bias = np.asarray(base.codebook[...]), np.asarray(base.bias[...])
    sources = [("pretrain", STAGE1)]
    if os.path.isdir(os.path.join(workdir, "prompt", "finetune_persona_mux")):
      sources.append(("finetune_persona_mux", HELD_OUT))
    for job, entry in stages.persona_jobs(workdir).items():
      stage = stages.job_stage(job, "persona_mux")
      if entry.get("method") == "persona_mux" and os.path.isdir(os.path.join(workdir, "prompt", stage)):
        sources.append((stage, job))
    personas: dict[str, Persona] = {}
    for stage, job in sources:
      module, meta = (base, meta) if stage == "pretrain" else stages.load_prompt(workdir, stage, d)
      if not np.array_equal(np.asarray(module.codebook[...]), codebook):
        raise ValueError(f"{os.path.join(workdir, 'prompt', stage)}: its codebook is not stage 1's; "
                         "it was trained from another run")
      mixtures = np.asarray(module.mixtures[...], np.float32)
      for i, name in enumerate(meta["classes"]):
        personas.pop(name, None)  # a later job that replaced a name takes it over
        personas[name] = Persona(name, mixtures[i], texts.get(name), job)
    return cls(codebook, bias, list(personas.values()), meta.get("prompt"))

  # --- lookup ---------------------------------------------------------------------------

  def __len__(self) -> int:
    return len(self._personas)

  def __contains__(self, name: str) -> bool:
    return name in self._personas

  @property
  def names(self) -> list[str]:
    return list(self._personas)

  def __getitem__(self, name: str) -> Persona:
    try:
      return self._personas[name]
    except KeyError:
      near = [n for n in self._personas if name.lower() in n.lower()][:5] or self.names[:5]
      raise KeyError(f"persona {name!r} is not in the bank ({len(self)} personas; e.g. {', '.join(near)})") \
          from None

  def describe(self) -> list[dict]:
    """One JSON-ready dict per persona: name, job and text persona."""
    return [{"name": p.name, "job": p.job, "persona": p.text} for p in self._personas.values()]

  # --- soft prompts ---------------------------------------------------------------------

  @property
  def module(self) -> prompts_lib.PersonaMux:
    """One `PersonaMux` holding every persona (class id = position in `names`)."""
    if self._module is None:
      n, k, d = self.codebook.shape
      m = prompts_lib.PersonaMux(max(len(self), 1), d, num_codes=n, code_tokens=k, bias_tokens=self.bias.shape[0],
                                 rngs=nnx.Rngs(0))
      m.codebook[...] = jnp.asarray(self.codebook)
      m.bias[...] = jnp.asarray(self.bias)
      if len(self):
        m.mixtures[...] = jnp.asarray(np.stack([p.mixtures for p in self._personas.values()]))
      self._module = m
    return self._module

  def class_ids(self, names: Sequence[str]) -> list[int]:
    index = {n: i for i, n in enumerate(self._personas)}
    for name in names:
      if name not in index:
        self[name]  # raises the KeyError that names the bank
    return [index[n] for n in names]

  def soft_prompts(self, names: Sequence[str], bias_scales: float | Sequence[float] = 1.0) -> sampling.SoftPrompts:
    """What `persomux.generate(..., soft_prompts=)` takes: one persona (and bias scale) per row."""
    if not isinstance(bias_scales, (int, float)):
      bias_scales = [float(s) for s in bias_scales]
      if len(bias_scales) != len(names):
        raise ValueError(f"{len(bias_scales)} bias scales for {len(names)} personas; give one per row or one "
                         "for all")
    return sampling.SoftPrompts(self.module, self.class_ids(names), bias_scales)

  # --- export ---------------------------------------------------------------------------

  def save(self, out_dir: str) -> str:
    """Writes `OUT/persona_mux.safetensors`: `codebook`, `bias`, `mixtures` (rows in
    `names` order) and, as metadata, the names and each persona's job and text
    persona. `PersonaBank.read` and, in PyTorch, `persomux.export.PersonaMuxPrompts`
    read it."""
    from persomux.export.peft_export import write_state

    return write_state(out_dir, self.module, self.names, self.prompt_config, self.describe())

  @classmethod
  def read(cls, path: str) -> "PersonaBank":
    """Reads a bank `save` wrote, or a single stage's state (`launch/export.py --stage`);
    a safetensors file, so nothing is unpickled."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
      meta = f.metadata() or {}
      t = {k: f.get_tensor(k) for k in ("codebook", "bias", "mixtures")}
    if "personas" in meta:
      rows = json.loads(meta["personas"])
    elif "classes" in meta:
      rows = [{"name": c, "job": os.path.basename(path), "persona": None} for c in json.loads(meta["classes"])]
    else:
      raise ValueError(f"{path}: no 'personas' or 'classes' metadata; expected a file launch/export.py wrote")
    if len(rows) != t["mixtures"].shape[0]:
      raise ValueError(f"{path}: {len(rows)} personas in the metadata but {t['mixtures'].shape[0]} mixture rows")
    personas = [Persona(r["name"], t["mixtures"][i], r["persona"], r["job"]) for i, r in enumerate(rows)]
    return cls(t["codebook"], t["bias"], personas, json.loads(meta.get("config", "{}")))
