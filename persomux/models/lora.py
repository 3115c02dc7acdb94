"""LoRA adapters on a frozen trunk (the paper's LoRA baseline).

`attach(trunk, LoRAConfig(...))` replaces every targeted projection
(`modeling.Linear`) of every layer by a `LoRALinear` over the same frozen
weight, as qwix/tunix wrap projections; the trunk itself knows nothing of
adapters. The trunk's own weights stay frozen and only `LoRAParam` variables
train (`nnx.Optimizer(trunk, tx, wrt=LoRAParam)`). `detach(trunk)` puts the
plain projections back, so one loaded trunk serves every method of an
evaluation. The trunk's layers are stacked per layer group, and so are the
adapters (`a` `[reps, rank, in]`, `b` `[reps, out, rank]`); `adapters(trunk)`
gives one view per layer. Targets use Hugging Face module names, so an
adapter exports 1:1 as a PEFT LoRA adapter (`persomux.export.peft_export`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from persomux.models import modeling
from persomux.models.config import TrunkConfig
from persomux.models.modeling import Trunk

__all__ = ["LoRALinear", "LoRAParam", "LoRAConfig", "TARGETS", "attach", "detach", "attached", "count", "adapters",
           "peft_tensors"]

# Hugging Face module name -> (block attribute in a DecoderLayer, block name in HF, in, out) from a config.
TARGETS = {
    "q_proj": ("attn", "self_attn", lambda c: (c.d_model, c.num_heads * c.head_dim)),
    "k_proj": ("attn", "self_attn", lambda c: (c.d_model, c.num_kv_heads * c.head_dim)),
    "v_proj": ("attn", "self_attn", lambda c: (c.d_model, c.num_kv_heads * c.head_dim)),
    "o_proj": ("attn", "self_attn", lambda c: (c.num_heads * c.head_dim, c.d_model)),
    "gate_proj": ("mlp", "mlp", lambda c: (c.d_model, c.ffn_dim)),
    "up_proj": ("mlp", "mlp", lambda c: (c.d_model, c.ffn_dim)),
    "down_proj": ("mlp", "mlp", lambda c: (c.ffn_dim, c.d_model)),
}


class LoRAParam(nnx.Param):
  """A trainable low-rank adapter weight (the LoRA baseline); never part of the checkpoint."""


class LoRALinear(nnx.Module):
  """A frozen projection plus a low-rank update, as PEFT computes it:
  `x @ weight.T (+ bias) + scaling * (x @ a.T) @ b.T`.

  `weight`/`bias` are the wrapped `modeling.Linear`'s own variables (same
  module path, so checkpoints and sharding rules see the trunk unchanged).
  `a` `[..., rank, in]` starts like PEFT's (Kaiming-uniform, bound 1/sqrt(in))
  and `b` `[..., out, rank]` at zero, so an attached adapter starts as the
  identity; leading axes follow the weight's (a layer group's `[reps]`).
  Adapter weights are float32; the update is cast to the activations' dtype.
  """

  def __init__(self, base: modeling.Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
    self.name, self.weight, self.bias = base.name, base.weight, base.bias
    *lead, out_features, in_features = base.weight.shape
    bound = 1.0 / math.sqrt(in_features)
    self.a = LoRAParam(jax.random.uniform(rngs.params(), (*lead, rank, in_features), jnp.float32, -bound, bound))
    self.b = LoRAParam(jnp.zeros((*lead, out_features, rank), jnp.float32))
    self.scaling = alpha / rank

  def __call__(self, x):
    y = modeling.linear(x, self.weight[...], None if self.bias is None else self.bias[...])
    h = jnp.einsum("...i,ri->...r", x.astype(jnp.float32), self.a[...])
    y = y + (self.scaling * jnp.einsum("...r,or->...o", h, self.b[...])).astype(x.dtype)
    return checkpoint_name(y, self.name)

  def unwrap(self) -> modeling.Linear:
    """The plain projection over the same weight and bias."""
    plain = nnx.eval_shape(lambda: modeling.Linear(1, 1, name=self.name, bias=self.bias is not None,
                                                   dtype=jnp.float32, rngs=None))
    plain.weight, plain.bias = self.weight, self.bias
    return plain


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Rank, scaling numerator (`alpha / rank` scales the update) and targeted projections."""

  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q_proj", "v_proj")

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown or not self.targets:
      raise ValueError(f"lora.targets {list(self.targets)!r}: expected a non-empty subset of "
                       f"{', '.join(TARGETS)}")

  @classmethod
  def from_config(cls, c) -> "LoRAConfig":
    c = dict(c)
    targets = c.get("targets", cls.targets)
    if isinstance(targets, str):
      targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    return cls(rank=int(c.get("rank", cls.rank)), alpha=float(c.get("alpha", cls.alpha)), targets=tuple(targets))

  def to_dict(self) -> dict:
    return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


def _projections(trunk: Trunk, names=TARGETS) -> Iterator[tuple[modeling.LayerGroup, int, nnx.Module, str]]:
  """`(layer group, pattern position, attn or mlp block, target name)` for every targeted projection."""
  for group in trunk.groups:
    for j, layer in enumerate(group.layers):
      for name in names:
        yield group, j, getattr(layer, TARGETS[name][0]), name


def attach(trunk: Trunk, cfg: LoRAConfig, seed: int = 0) -> None:
  """Wraps each targeted projection in a fresh adapter (replacing any attached ones)."""
  detach(trunk)
  rngs = nnx.Rngs(seed)
  for _, _, block, name in _projections(trunk, cfg.targets):
    setattr(block, name, LoRALinear(getattr(block, name), cfg.rank, cfg.alpha, rngs=rngs))


def detach(trunk: Trunk) -> None:
  """Removes every adapter; the trunk computes exactly what it did before `attach`."""
  for _, _, block, name in _projections(trunk):
    proj = getattr(block, name)
    if isinstance(proj, LoRALinear):
      setattr(block, name, proj.unwrap())


@contextlib.contextmanager
def attached(trunk: Trunk, cfg: LoRAConfig, seed: int = 0):
  attach(trunk, cfg, seed)
  try:
    yield trunk
  finally:
    detach(trunk)


class LayerSlice:
  """One layer's slice `[rep]` of a stacked variable; `[...]` reads and writes it."""

  def __init__(self, var: nnx.Variable, rep: int):
    self.var, self.rep = var, rep

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.var.shape[1:])

  def __getitem__(self, idx):
    return self.var[...][self.rep][idx]

  def __setitem__(self, idx, value):
    full = self.var[...]
    self.var[...] = full.at[self.rep].set(full[self.rep].at[idx].set(value))


@dataclasses.dataclass(frozen=True)
class LayerAdapter:
  """One layer's adapter: `a` `[rank, in]` and `b` `[out, rank]` (slices of the stacked weights)."""

  a: LayerSlice
  b: LayerSlice


def adapters(trunk: Trunk) -> Iterator[tuple[int, str, LayerAdapter]]:
  """`(layer index, target name, LayerAdapter)` for every attached adapter, by layer."""
  found = []
  for group, j, block, name in _projections(trunk):
    proj = getattr(block, name)
    if isinstance(proj, LoRALinear):
      for rep in range(group.reps):
        found.append((group.start + rep * len(group.kinds) + j, list(TARGETS).index(name), name,
                      LayerAdapter(LayerSlice(proj.a, rep), LayerSlice(proj.b, rep))))
  for i, _, name, adapter in sorted(found, key=lambda f: f[:2]):
    yield i, name, adapter


def count(config: TrunkConfig, cfg: LoRAConfig) -> int:
  """Trainable parameters of the adapters: rank * (in + out) per target and layer."""
  return config.num_layers * sum(cfg.rank * sum(TARGETS[t][2](config)) for t in cfg.targets)


def peft_tensors(trunk: Trunk) -> dict[str, np.ndarray]:
  """The attached adapters under PEFT's tensor names (`...q_proj.lora_A.weight` `[r, in]`, `lora_B` `[out, r]`)."""
  out = {}
  for i, name, a in adapters(trunk):
    hf_block = TARGETS[name][1]
    base = f"base_model.model.model.layers.{i}.{hf_block}.{name}"
    out[f"{base}.lora_A.weight"] = np.asarray(a.a[...], np.float32)
    out[f"{base}.lora_B.weight"] = np.asarray(a.b[...], np.float32)
  if not out:
    raise ValueError("the trunk has no LoRA adapters attached")
  return out
