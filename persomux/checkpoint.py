"""Atomic, resumable checkpoints of prompt state (orbax).

A checkpoint holds only what training changes: the prompt module's state,
the optimizer state and the data position (JSON). The frozen trunk is never
saved here; the run's config names the checkpoint directory it came from.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx


class Part:
  """The variables of `module` that match `filter` (e.g. a trunk's LoRA adapters), saved on their own."""

  def __init__(self, module: nnx.Module, filter):
    self.module, self.filter = module, filter

  def state(self):
    return nnx.state(self.module, self.filter)


def _state(module):
  return module.state() if isinstance(module, Part) else nnx.state(module)


def module_arrays(module: nnx.Module | Part) -> dict:
  """The module's state (or a `Part`'s) as a pure nested dict of arrays."""
  return nnx.to_pure_dict(_state(module))


def restore_into(module: nnx.Module | Part, arrays: dict) -> None:
  """Writes `arrays` (as returned by `module_arrays`) back into `module` in place."""
  state = _state(module)
  nnx.replace_by_pure_dict(state, arrays)
  nnx.update(module.module if isinstance(module, Part) else module, state)


class Checkpointer:
  """Periodic and final checkpoints under `directory`, keeping the newest `keep`."""

  def __init__(self, directory: str, keep: int = 2):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, modules: dict[str, nnx.Module], meta: dict[str, Any]) -> None:
    """Saves `modules` (e.g. {"prompt": ..., "opt": ...}) and JSON `meta` at `step`."""
    state = {name: module_arrays(m) for name, m in modules.items()}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def restore(self, modules: dict[str, nnx.Module], step: int | None = None) -> dict[str, Any]:
    """Restores `modules` in place from `step` (default: latest); returns the meta."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
    target = {name: module_arrays(m) for name, m in modules.items()}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    for name, m in modules.items():
      restore_into(m, out["state"][name])
    return dict(out["meta"])

  def close(self):
    self.manager.close()
