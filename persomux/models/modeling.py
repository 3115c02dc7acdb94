"""Flax NNX decoder trunks: Llama 1/2/3.x, Gemma 1, Gemma 2 and Gemma 3 text.

One implementation covers the four families; `TrunkConfig` switches the
family-specific parts (norm offset, embedding scale, soft-capping, sliding
windows, q/k norms, per-layer-kind rotary tables). Weights keep Hugging Face's
layout (`[out_features, in_features]`), so checkpoint I/O is a name mapping
with no transposes (see `params.py`).

The math follows transformers' PyTorch modules, which the tests use as the
reference: norms and softmax run in float32, everything else in the weights'
dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persomux.models.config import FULL, SLIDING, RopeConfig, TrunkConfig

# The most negative finite value keeps fully masked rows finite (no NaN).
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


def _gelu_exact(x):
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu": _gelu_exact,
    "relu": jax.nn.relu,
}


def _weight(rngs: nnx.Rngs | None, shape, dtype, std=0.02):
  if rngs is None:
    return nnx.Param(jnp.zeros(shape, dtype))
  return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


def _linear(x, w, b=None):
  """`x @ w.T (+ b)` with `w` in Hugging Face layout `[out, in]`."""
  y = jnp.einsum("...i,oi->...o", x, w)
  return y if b is None else y + b


class LoRAParam(nnx.Param):
  """A trainable low-rank adapter weight (the LoRA baseline); never part of the checkpoint."""


class LoRA(nnx.Module):
  """A low-rank update of one projection: `x -> scaling * (x @ a.T) @ b.T`, as PEFT computes it.

  `a` `[rank, in]` starts like PEFT's (Kaiming-uniform, bound 1/sqrt(in)) and
  `b` `[out, rank]` at zero, so an attached adapter starts as the identity.
  Weights are float32; the update is cast to the activations' dtype.
  """

  def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, *, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(in_features)
    self.a = LoRAParam(jax.random.uniform(rngs.params(), (rank, in_features), jnp.float32, -bound, bound))
    self.b = LoRAParam(jnp.zeros((out_features, rank), jnp.float32))
    self.scaling = alpha / rank

  def __call__(self, x):
    h = jnp.einsum("...i,ri->...r", x.astype(jnp.float32), self.a[...])
    return (self.scaling * jnp.einsum("...r,or->...o", h, self.b[...])).astype(x.dtype)


def _project(x, w, b, lora):
  """A projection with its optional bias and optional LoRA adapter (None when absent)."""
  y = _linear(x, w[...], None if b is None else b[...])
  return y if lora is None else y + lora(x)


class RMSNorm(nnx.Module):
  """RMS norm. Llama scales by `w`; Gemma by `(1 + w)` in float32."""

  def __init__(self, dim: int, eps: float, *, gemma: bool, dtype=jnp.float32):
    self.eps = eps
    self.gemma = gemma
    self.weight = nnx.Param(jnp.zeros((dim,), dtype) if gemma else jnp.ones((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.gemma:
      return (y * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
    return self.weight[...] * y.astype(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
  """Inverse frequencies `[head_dim // 2]` (float32), with linear or llama3 scaling."""
  inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
  inv = inv.astype(np.float32)
  if rope.rope_type == "linear":
    inv = inv / rope.factor
  elif rope.rope_type == "llama3":
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
  """cos, sin `[batch, seq, head_dim]` for integer `positions` `[batch, seq]`."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates `x` `[batch, seq, heads, head_dim]` (the rotate-half convention)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention_mask(q_positions: jax.Array, k_positions: jax.Array, k_valid: jax.Array,
                   sliding_window: int | None) -> jax.Array:
  """Boolean mask `[batch, 1, q, k]`: causal, padding and (optionally) sliding window.

  A key at position pk is visible from a query at pq when pk <= pq and, for
  sliding layers, pk > pq - sliding_window (transformers' convention).
  """
  qp = q_positions[:, :, None]
  kp = k_positions[:, None, :]
  mask = (kp <= qp) & k_valid[:, None, :].astype(bool)
  if sliding_window is not None:
    mask &= kp > qp - sliding_window
  return mask[:, None, :, :]


class Attention(nnx.Module):
  """Grouped-query attention `[batch, seq, d_model] -> [batch, seq, d_model]`."""

  def __init__(self, cfg: TrunkConfig, layer_type: str, *, dtype, rngs: nnx.Rngs | None):
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.scale = cfg.attn_scale
    self.softcap = cfg.attn_softcap
    d, q_out, kv_out = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    self.q_proj = _weight(rngs, (q_out, d), dtype)
    self.k_proj = _weight(rngs, (kv_out, d), dtype)
    self.v_proj = _weight(rngs, (kv_out, d), dtype)
    self.o_proj = _weight(rngs, (d, q_out), dtype)
    if cfg.attention_bias:
      self.q_bias = nnx.Param(jnp.zeros((q_out,), dtype))
      self.k_bias = nnx.Param(jnp.zeros((kv_out,), dtype))
      self.v_bias = nnx.Param(jnp.zeros((kv_out,), dtype))
      self.o_bias = nnx.Param(jnp.zeros((d,), dtype))
    else:
      self.q_bias = self.k_bias = self.v_bias = self.o_bias = None
    if cfg.family == "gemma3_text":
      self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, gemma=True, dtype=dtype)
      self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, gemma=True, dtype=dtype)
    else:
      self.q_norm = self.k_norm = None
    # LoRA adapters (see `persomux.models.lora`); None when not attached.
    for name in ("q_proj_lora", "k_proj_lora", "v_proj_lora", "o_proj_lora"):
      setattr(self, name, nnx.data(None))

  def project_kv(self, x, cos, sin):
    """Rotated keys and values `[batch, kv_heads, seq, head_dim]` for `x`.

    Heads come before positions so that attending over a long KV cache is a
    plain batched matmul, with no per-step transpose of the cache.
    """
    b, t, _ = x.shape
    k = _project(x, self.k_proj, self.k_bias, self.k_proj_lora)
    v = _project(x, self.v_proj, self.v_bias, self.v_proj_lora)
    k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
    v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.k_norm is not None:
      k = self.k_norm(k)
    return apply_rope(k, cos, sin).transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

  def __call__(self, x, cos, sin, mask, kv_update=None):
    """Attention of `x` `[batch, q, d_model]` over its own keys, or over a cache.

    `mask` is `[batch, 1, q, k]` boolean. `kv_update`, if given, maps this
    call's rotated keys and values `[batch, kv_heads, q, head_dim]` to the
    full key/value arrays to attend over (e.g. a KV cache with them written
    in). Returns `(out [batch, q, d_model], (keys, values))`.
    """
    b, t, _ = x.shape
    q = _project(x, self.q_proj, self.q_bias, self.q_proj_lora)
    q = q.reshape(b, t, self.num_heads, self.head_dim)
    if self.q_norm is not None:
      q = self.q_norm(q)
    q = apply_rope(q, cos, sin)
    k, v = self.project_kv(x, cos, sin)
    if kv_update is not None:
      k, v = kv_update(k, v)
    groups = self.num_heads // self.num_kv_heads
    q = q.reshape(b, t, self.num_kv_heads, groups, self.head_dim)
    logits = jnp.einsum("btkgh,bksh->bkgts", q, k) * jnp.asarray(self.scale, q.dtype)
    logits = logits.astype(jnp.float32)
    if self.softcap:
      logits = jnp.tanh(logits / self.softcap) * self.softcap
    logits = jnp.where(mask[:, :, None], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, v).reshape(b, t, self.num_heads * self.head_dim)
    out = _project(out, self.o_proj, self.o_bias, self.o_proj_lora)
    return out, (k, v)


class MLP(nnx.Module):
  """Gated MLP: `down(act(gate(x)) * up(x))`."""

  def __init__(self, cfg: TrunkConfig, *, dtype, rngs: nnx.Rngs | None):
    if cfg.activation not in ACTIVATIONS:
      raise ValueError(f"activation {cfg.activation!r} is not supported; expected one of "
                       f"{', '.join(sorted(ACTIVATIONS))}")
    self.act = ACTIVATIONS[cfg.activation]
    self.gate_proj = _weight(rngs, (cfg.ffn_dim, cfg.d_model), dtype)
    self.up_proj = _weight(rngs, (cfg.ffn_dim, cfg.d_model), dtype)
    self.down_proj = _weight(rngs, (cfg.d_model, cfg.ffn_dim), dtype)
    if cfg.mlp_bias:
      self.gate_bias = nnx.Param(jnp.zeros((cfg.ffn_dim,), dtype))
      self.up_bias = nnx.Param(jnp.zeros((cfg.ffn_dim,), dtype))
      self.down_bias = nnx.Param(jnp.zeros((cfg.d_model,), dtype))
    else:
      self.gate_bias = self.up_bias = self.down_bias = None
    for name in ("gate_proj_lora", "up_proj_lora", "down_proj_lora"):
      setattr(self, name, nnx.data(None))

  def __call__(self, x):
    h = self.act(_project(x, self.gate_proj, self.gate_bias, self.gate_proj_lora)) * _project(
        x, self.up_proj, self.up_bias, self.up_proj_lora)
    return _project(h, self.down_proj, self.down_bias, self.down_proj_lora)


class DecoderLayer(nnx.Module):
  """Pre-norm decoder block; Gemma 2/3 add post-attention and post-MLP norms."""

  def __init__(self, cfg: TrunkConfig, layer_type: str, *, dtype, rngs: nnx.Rngs | None):
    self.layer_type = layer_type
    gemma = cfg.is_gemma
    norm = lambda: RMSNorm(cfg.d_model, cfg.norm_eps, gemma=gemma, dtype=dtype)
    self.attn_norm = norm()
    self.attn = Attention(cfg, layer_type, dtype=dtype, rngs=rngs)
    self.mlp_norm = norm()
    self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)
    sandwich = cfg.family in ("gemma2", "gemma3_text")
    self.attn_post_norm = norm() if sandwich else None
    self.mlp_post_norm = norm() if sandwich else None

  def __call__(self, x, cos, sin, mask, kv_update=None):
    """Returns `(x, (keys, values))`; see `Attention.__call__` for `kv_update`."""
    h, kv = self.attn(self.attn_norm(x), cos, sin, mask, kv_update)
    if self.attn_post_norm is not None:
      h = self.attn_post_norm(h)
    x = x + h
    h = self.mlp(self.mlp_norm(x))
    if self.mlp_post_norm is not None:
      h = self.mlp_post_norm(h)
    return x + h, kv


class Trunk(nnx.Module):
  """A decoder-only language model.

  Call with `input_ids` `[batch, seq]` or `inputs_embeds` `[batch, seq, d_model]`
  (already scaled, as `embed` returns them), an optional `attention_mask`
  `[batch, seq]` (1 = real token) and optional `positions` `[batch, seq]`
  (default: 0..seq-1). Returns logits `[batch, seq, vocab]` in float32.
  """

  def __init__(self, cfg: TrunkConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
               remat: bool = False):
    self.config = cfg
    self.dtype = jnp.dtype(dtype)
    self.remat = remat
    self.embed_tokens = _weight(rngs, (cfg.vocab_size, cfg.d_model), dtype)
    self.layers = nnx.List([DecoderLayer(cfg, t, dtype=dtype, rngs=rngs) for t in cfg.layer_types])
    self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, gemma=cfg.is_gemma, dtype=dtype)
    self.lm_head = None if cfg.tie_embeddings else _weight(rngs, (cfg.vocab_size, cfg.d_model), dtype)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """Input embeddings `[batch, seq, d_model]` (scaled by sqrt(d_model) for Gemma)."""
    x = jnp.take(self.embed_tokens[...], input_ids, axis=0)
    if self.config.is_gemma:
      x = x * jnp.asarray(self.config.embed_scale, self.dtype)
    return x

  def rope_tables(self, positions: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
    cfg = self.config
    return {kind: rope_cos_sin(positions, rope_inv_freq(cfg.rope_for(kind), cfg.head_dim), self.dtype)
            for kind in (FULL, SLIDING)}

  def masks(self, q_positions, k_positions, k_valid) -> dict[str, jax.Array]:
    return {FULL: attention_mask(q_positions, k_positions, k_valid, None),
            SLIDING: attention_mask(q_positions, k_positions, k_valid, self.config.sliding_window)}

  def logits(self, h: jax.Array) -> jax.Array:
    """Final norm, LM head and soft-capping: `[batch, seq, d_model] -> [batch, seq, vocab]`."""
    h = self.norm(h)
    head = self.embed_tokens if self.lm_head is None else self.lm_head
    logits = _linear(h, head[...]).astype(jnp.float32)
    if self.config.final_softcap:
      cap = self.config.final_softcap
      logits = jnp.tanh(logits / cap) * cap
    return logits

  def hidden_states(self, inputs_embeds, attention_mask=None, positions=None) -> jax.Array:
    """Runs the decoder layers; returns the last hidden states before the final norm."""
    b, t, _ = inputs_embeds.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    tables = self.rope_tables(positions)
    masks = self.masks(positions, positions, attention_mask)
    h = inputs_embeds.astype(self.dtype)

    for layer in self.layers:
      cos, sin = tables[layer.layer_type]
      mask = masks[layer.layer_type]
      if self.remat:
        # A pure function of the layer's state, so rematerialization never
        # writes back into modules owned by an outer trace (e.g. a grad).
        graphdef, state = nnx.split(layer)
        h = jax.checkpoint(lambda st, x, c, s_, m: nnx.merge(graphdef, st)(x, c, s_, m)[0])(
            state, h, cos, sin, mask)
      else:
        h = layer(h, cos, sin, mask)[0]
    return h

  def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, positions=None):
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
      inputs_embeds = self.embed(input_ids)
    return self.logits(self.hidden_states(inputs_embeds, attention_mask, positions))
