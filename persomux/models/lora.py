"""LoRA adapters on a frozen trunk (the paper's LoRA baseline).

`attach(trunk, LoRAConfig(...))` puts a `modeling.LoRA` adapter on every
targeted projection of every layer; the trunk's own weights stay frozen and
only `LoRAParam` variables train (`nnx.Optimizer(trunk, tx, wrt=LoRAParam)`).
`detach(trunk)` takes them off again, so one loaded trunk serves every
method of an evaluation. Targets use Hugging Face module names, so an
adapter exports 1:1 as a PEFT LoRA adapter (`persomux.export.peft_export`).
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
from flax import nnx

from persomux.models.config import TrunkConfig
from persomux.models.modeling import LoRA, LoRAParam, Trunk

__all__ = ["LoRA", "LoRAParam", "LoRAConfig", "TARGETS", "attach", "detach", "attached", "count", "adapters",
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


def attach(trunk: Trunk, cfg: LoRAConfig, seed: int = 0) -> None:
  """Puts a fresh adapter on each targeted projection (replacing any attached ones)."""
  rngs = nnx.Rngs(seed)
  tc = trunk.config
  for layer in trunk.layers:
    for name in cfg.targets:
      block, _, dims = TARGETS[name]
      d_in, d_out = dims(tc)
      setattr(getattr(layer, block), f"{name}_lora", LoRA(d_in, d_out, cfg.rank, cfg.alpha, rngs=rngs))


def detach(trunk: Trunk) -> None:
  """Removes every adapter; the trunk computes exactly what it did before `attach`."""
  for layer in trunk.layers:
    for name, (block, _, _) in TARGETS.items():
      setattr(getattr(layer, block), f"{name}_lora", None)


@contextlib.contextmanager
def attached(trunk: Trunk, cfg: LoRAConfig, seed: int = 0):
  attach(trunk, cfg, seed)
  try:
    yield trunk
  finally:
    detach(trunk)


def adapters(trunk: Trunk):
  """`(layer index, target name, LoRA)` for every attached adapter."""
  for i, layer in enumerate(trunk.layers):
    for name, (block, _, _) in TARGETS.items():
      a = getattr(getattr(layer, block), f"{name}_lora")
      if a is not None:
        yield i, name, a


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
