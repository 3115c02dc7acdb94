"""Meshes and sharding rules: trunk (FSDP + tensor parallel), prompt state, batches.

Axis names are `data`, `fsdp` and `tensor`. Weights keep Hugging Face's
`[out, in]` layout: projections into heads/MLP shard `out` over `tensor` and
`in` over `fsdp`; projections back to `d_model` the other way round. The
stacked weights of a layer group keep their leading `[reps]` axis unsharded,
and KV caches shard their kv heads over `tensor` (rows over the batch axes).
A dimension that an axis does not divide stays replicated on that axis.

Shardings are laid out on an `Auto`-typed copy of the mesh (XLA propagates
them), so a mesh built with `jax.make_mesh`'s explicit axes works as well.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def parse_mesh(spec: str | None, devices=None) -> jax.sharding.Mesh:
  """A mesh from `"data:2,fsdp:2,tensor:2"`; empty: every device on `data`.

  One axis may be `-1` to take the remaining devices.
  """
  devices = devices if devices is not None else jax.devices()
  n = len(devices)
  sizes = {a: 1 for a in AXES}
  if spec:
    for part in spec.split(","):
      name, _, size = part.partition(":")
      name = name.strip()
      if name not in AXES:
        raise ValueError(f"--mesh: axis {name!r} is unknown; expected {', '.join(AXES)}")
      try:
        sizes[name] = int(size)
      except ValueError as e:
        raise ValueError(f"--mesh: axis {name!r} needs an integer size, got {size!r}") from e
    if list(sizes.values()).count(-1) > 1:
      raise ValueError("--mesh: at most one axis may be -1")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    for a, s in sizes.items():
      if s == -1:
        sizes[a] = n // known
  else:
    sizes["data"] = n
  total = int(np.prod(list(sizes.values())))
  if total != n:
    raise ValueError(f"--mesh {spec!r} needs {total} devices; {n} are available")
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices)


def auto_mesh(mesh) -> jax.sharding.Mesh:
  """`mesh` with every axis `Auto`: persomux's shardings leave propagation to XLA,
  which explicit axes (`jax.make_mesh`'s default) would refuse, e.g. for the
  embedding gather."""
  if all(t == AxisType.Auto for t in mesh.axis_types):
    return mesh
  return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


# (regex over the module path, spec for [out, in] or [d]) — first match wins.
_TRUNK_RULES = (
    (r"embed_tokens|lm_head", ("tensor", "fsdp")),
    (r".*\.(q|k|v|gate|up)_proj\.weight", ("tensor", "fsdp")),
    (r".*\.(o|down)_proj\.weight", ("fsdp", "tensor")),
    (r".*\.(q|k|v|gate|up)_proj\.bias", ("tensor",)),
    (r".*", ()),  # norms, LoRA adapters
)


def _fit(spec: tuple, shape: tuple, mesh) -> P:
  """Drops axes that the mesh lacks or that do not divide their dimension."""
  out = []
  for dim, axis in zip(shape, spec + (None,) * (len(shape) - len(spec))):
    names = tuple(a for a in ((axis,) if isinstance(axis, str) else axis or ()) if a in mesh.shape)
    size = int(np.prod([mesh.shape[a] for a in names]))
    if not names or size == 1 or dim % size:
      out.append(None)
    else:
      out.append(names[0] if len(names) == 1 and isinstance(axis, str) else names)
  return P(*out)


def trunk_spec(path: tuple, shape: tuple, mesh) -> P:
  """The spec of the trunk variable at `path`; a layer group's stacked weights
  (`groups.{g}.layers.{j}...`) keep their leading `[reps]` axis unsharded."""
  key = ".".join(str(p) for p in path)
  stacked = (None,) if path and path[0] == "groups" else ()
  for pattern, spec in _TRUNK_RULES:
    if re.fullmatch(pattern, key):
      return _fit(stacked + spec, shape, mesh)
  return P()


def cache_spec(shape: tuple, mesh) -> P:
  """A KV cache `[reps, batch, kv_heads, ...]` (keys `head_dim, slots`, values `slots, head_dim`): rows over the batch
  axes, kv heads over `tensor`."""
  return _fit((None, BATCH_AXES, "tensor"), shape, mesh)


def prompt_spec(path: tuple, shape: tuple, mesh) -> P:
  """Codebook and bias replicated; mixture/prompt tables sharded over classes."""
  key = str(path[-1]) if path else ""
  if key in ("mixtures", "prompts"):
    return _fit((BATCH_AXES,), shape, mesh)
  return P()


def batch_sharding(mesh, ndim: int) -> NamedSharding:
  return NamedSharding(auto_mesh(mesh), P(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch: dict, mesh) -> dict:
  """Places this process's rows of a batch into global arrays sharded over the data axes.

  On one host the local rows are the whole batch; on several hosts each
  process passes its own slice (see `data.ShuffledBatches(shard=...)`).
  """
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in batch.items()}


def shard_placer(mesh):
  """A `place` function for `params.load_trunk`: each weight's sharding by
  `trunk_spec`, into which every device reads only its slice."""
  mesh = auto_mesh(mesh)
  return lambda path, shape: NamedSharding(mesh, trunk_spec(path, shape, mesh))


def shard_module(module, mesh, spec_fn=prompt_spec):
  """Reshards every variable of `module` in place according to `spec_fn`."""
  from flax import nnx

  mesh = auto_mesh(mesh)
  state = nnx.state(module)
  flat = nnx.to_flat_state(state)
  new = []
  for path, var in flat:
    value = var.get_value()
    sharding = NamedSharding(mesh, spec_fn(path, tuple(np.shape(value)), mesh))
    new.append((path, var.replace(jax.device_put(value, sharding))))
  nnx.update(module, nnx.from_flat_state(new))
  return module
