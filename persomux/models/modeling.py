"""Flax NNX decoder trunks: Llama 1/2/3.x, Gemma 1, Gemma 2 and Gemma 3 text.

One implementation covers the four families; `TrunkConfig` switches the
family-specific parts (norm offset, embedding scale, soft-capping, sliding
windows, q/k norms, per-layer-kind rotary tables). Weights keep Hugging Face's
layout (`[out_features, in_features]`), so checkpoint I/O is a name mapping
with no transposes (see `params.py`).

The decoder layers are stacked and scanned: `config.layer_groups` splits them
into groups of a repeating layer pattern (all layers of a Llama; Gemma 2's
(sliding, full) pairs; Gemma 3's 5 sliding + 1 full, plus any tail), each
weight of a group carries a leading `[reps]` axis, and `LayerGroup.scan` runs
one `jax.lax.scan` over the repetitions, rematerializing each layer by the
trunk's `remat` policy inside the scanned body.

The math follows transformers' PyTorch modules, which the tests use as the
reference: norms and softmax run in float32, everything else in the weights'
dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from persomux.models import config as config_lib
from persomux.models.config import FULL, SLIDING, RopeConfig, TrunkConfig

# The most negative finite value keeps fully masked rows finite (no NaN).
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

# Queries per block of the XLA attention path: longer sequences attend block by
# block, so only `[batch, heads, ATTENTION_CHUNK, keys]` scores exist at a time.
ATTENTION_CHUNK = 256


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

# --- rematerialization ---------------------------------------------------------

# Outputs of the projections carry these checkpoint names (`Linear.name`).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

REMAT_POLICIES = {
    # No rematerialization: the backward pass keeps whatever it needs.
    "none": None,
    # Recompute each layer from its input in the backward pass.
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep the projections' outputs (q/k/v, gate/up, and o/down where a norm
    # follows them) and recompute the rest: norms, rotary, attention scores and
    # activations. For a frozen trunk, whose backward pass needs no projection
    # inputs, no matmul is recomputed and no `[seq, seq]` scores are kept.
    "save_qkv_mlp": jax.checkpoint_policies.save_only_these_names(*PROJECTIONS),
}


def remat_policy(remat: bool | str | None) -> str:
  """The name of a remat setting: a name of `REMAT_POLICIES`, or a bool (True = "full")."""
  if remat is True:
    return "full"
  if remat is False or remat is None or remat == "":
    return "none"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}: expected a bool or one of {', '.join(REMAT_POLICIES)}")
  return remat


# --- building blocks -----------------------------------------------------------


def _weight(rngs: nnx.Rngs | None, shape, dtype, std=0.02):
  if rngs is None:
    return nnx.Param(jnp.zeros(shape, dtype))
  return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


SPLIT_ROWS = 64  # under `few_row_products`, products of at most this many rows split their outputs
_FEW_ROWS = contextvars.ContextVar("few_row_products", default=False)


@contextlib.contextmanager
def few_row_products():
  """Traced within, `linear` products of a few rows (a decode step's) on CPU run as one
  product batched over blocks of their outputs (see `_out_splits`)."""
  token = _FEW_ROWS.set(True)
  try:
    yield
  finally:
    _FEW_ROWS.reset(token)


def _out_splits(rows: int, out: int) -> int:
  """How many blocks of outputs `linear` computes `rows` rows in, as one batched product.

  On XLA:CPU a product of a few rows reads its weights at about half the speed of
  the same product batched over blocks of its outputs, which it spreads over its
  threads (measured on a decode step's projections and head, 8 rows, 2 cores).
  Under `few_row_products` on CPU: up to 16 blocks of at least 64 outputs each
  (the reshape is free, and a weight sharded over its outputs stays so); else 1.
  The same sums, in another kernel's rounding."""
  if not _FEW_ROWS.get() or rows > SPLIT_ROWS or jax.default_backend() != "cpu":
    return 1
  s = 16
  while s > 1 and (out % s or out // s < 64):
    s //= 2
  return s


def linear(x, w, b=None):
  """`x @ w.T (+ b)` with `w` in Hugging Face layout `[out, in]`."""
  rows = math.prod(x.shape[:-1])
  s = _out_splits(rows, w.shape[0])
  if s == 1:
    y = jnp.einsum("...i,oi->...o", x, w)
  else:  # the same products, output blocks as a batch axis (a free reshape of `w`)
    y = jnp.einsum("ri,soi->sro", x.reshape(rows, x.shape[-1]), w.reshape(s, -1, w.shape[-1]))
    y = jnp.moveaxis(y, 0, 1).reshape(*x.shape[:-1], w.shape[0])
  return y if b is None else y + b


class Linear(nnx.Module):
  """A projection `x @ weight.T (+ bias)` with `weight` `[out, in]` (Hugging Face layout).

  `lead` prepends axes to the weights (a layer group's `[reps]`). The output
  carries the checkpoint name `name` (see `REMAT_POLICIES`). Adapters replace
  a `Linear` by a module with the same `weight`/`bias` (`persomux.models.lora`).
  """

  def __init__(self, in_features: int, out_features: int, *, name: str, bias: bool, dtype,
               rngs: nnx.Rngs | None, lead: tuple[int, ...] = ()):
    self.name = name
    self.weight = _weight(rngs, lead + (out_features, in_features), dtype)
    self.bias = nnx.Param(jnp.zeros(lead + (out_features,), dtype)) if bias else None

  def __call__(self, x):
    return checkpoint_name(linear(x, self.weight[...], None if self.bias is None else self.bias[...]), self.name)


class RMSNorm(nnx.Module):
  """RMS norm. Llama scales by `w`; Gemma by `(1 + w)` in float32."""

  def __init__(self, dim: int, eps: float, *, gemma: bool, dtype=jnp.float32, lead: tuple[int, ...] = ()):
    self.eps = eps
    self.gemma = gemma
    self.weight = nnx.Param(jnp.zeros(lead + (dim,), dtype) if gemma else jnp.ones(lead + (dim,), dtype))

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


# --- attention -------------------------------------------------------------------


def _cudnn_eligible(q: jax.Array) -> bool:
  return jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)


def einsum_attention(q, k, v, mask, *, scale: float, softcap: float | None):
  """Softmax attention by einsums, with optional tanh soft-capping of the scores.

  `q` `[batch, q, heads, head_dim]`; `k`, `v` `[batch, keys, kv_heads, head_dim]`;
  `mask` boolean, broadcastable to `[batch, 1, q, keys]`. Scores and
  softmax are float32. Returns `[batch, q, heads, head_dim]`.
  """
  b, t, n, h = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, n // kv, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  return _softmax_values(logits, mask[:, :, None], v, "bkgts,bskh->btkgh", softcap).reshape(b, t, n, h)


def cache_attention(q, k, v, mask, *, scale: float, softcap: float | None, key_block: int = 0):
  """`einsum_attention` of one new query per row over a KV cache's layout.

  `q` `[batch, 1, heads, head_dim]`; values `[batch, kv_heads, slots,
  head_dim]`; keys like the values, or with a `key_block` B in blocks of B
  slots, each block transposed, `[batch, kv_heads, slots / B, head_dim, B]`;
  `mask` `[batch, 1, 1, slots]`. Blocked, the scores are a sum of products
  over each block, read in one contiguous pass (on CPU, where XLA's product
  reads keys transposed whole as one strided stream per head_dim row, the
  benchmark trunk's attention over 576 slots ran 1.5 times as fast).
  """
  b, _, n, h = q.shape
  kv = v.shape[1]
  q = q.reshape(b, kv, n // kv, h)
  if key_block:
    f32 = jnp.float32
    logits = jnp.sum(q.astype(f32)[:, :, :, None, :, None] * k.astype(f32)[:, :, None], axis=4)
    logits = logits.reshape(b, kv, n // kv, -1)
  else:
    logits = jnp.einsum("bkgh,bksh->bkgs", q, k, preferred_element_type=jnp.float32)
  return _softmax_values(logits * scale, mask, v, "bkgs,bksh->bkgh", softcap).reshape(b, 1, n, h)


def _softmax_values(logits, mask, v, values: str, softcap: float | None):
  """The values `v` weighted by the (soft-capped, masked) softmax of float32 `logits`."""
  if softcap:
    logits = jnp.tanh(logits / softcap) * softcap
  logits = jnp.where(mask, logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum(values, probs, v)


def _attention_block(q, k, v, mask, *, scale, softcap):
  if softcap:
    return einsum_attention(q, k, v, mask, scale=scale, softcap=softcap)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=None)


def attend(q, k, v, mask, *, scale: float, softcap: float | None = None, chunk: int = ATTENTION_CHUNK):
  """Attention of `q` `[batch, q, heads, head_dim]` over `k`, `v` `[batch, keys, kv_heads, head_dim]`
  under the boolean `mask` `[batch, 1, q, keys]`; returns `[batch, q, heads, head_dim]`.

  Without soft-capping this is `jax.nn.dot_product_attention`: cuDNN's fused
  kernel on GPU in half precision, else XLA's. Soft-capped scores (Gemma 2)
  take the einsum path. On the XLA paths, more than `chunk` queries attend
  block by block, each block rematerialized in the backward pass, so no
  `[q, keys]` float32 score tensor of the whole sequence ever exists.
  """
  if not softcap and _cudnn_eligible(q):
    try:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    except (ValueError, NotImplementedError, RuntimeError):
      pass  # a shape, head size or cuDNN version the fused kernel does not take: XLA below
  block = functools.partial(_attention_block, scale=scale, softcap=softcap)
  b, t, n, h = q.shape
  if t <= chunk:
    return block(q, k, v, mask)
  blocks = -(-t // chunk)
  size = -(-t // blocks)
  pad = blocks * size - t  # padded queries see no key; their rows are dropped below
  mask = jnp.broadcast_to(mask, (b, 1, t, k.shape[1]))
  qs = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, blocks, size, n, h).swapaxes(0, 1)
  ms = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, 1, blocks, size, -1).transpose(2, 0, 1, 3, 4)
  one = jax.checkpoint(lambda qb, mb, k, v: block(qb, k, v, mb))
  out = jax.lax.map(lambda xs: one(xs[0], xs[1], k, v), (qs, ms))
  return out.swapaxes(0, 1).reshape(b, blocks * size, n, h)[:, :t]


AttendFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


class Attention(nnx.Module):
  """Grouped-query attention `[batch, seq, d_model] -> [batch, seq, d_model]`."""

  def __init__(self, cfg: TrunkConfig, layer_type: str, *, dtype, rngs: nnx.Rngs | None,
               lead: tuple[int, ...] = ()):
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.scale = cfg.attn_scale
    self.softcap = cfg.attn_softcap
    d, q_out, kv_out = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    lin = functools.partial(Linear, bias=cfg.attention_bias, dtype=dtype, rngs=rngs, lead=lead)
    self.q_proj = lin(d, q_out, name="q_proj")
    self.k_proj = lin(d, kv_out, name="k_proj")
    self.v_proj = lin(d, kv_out, name="v_proj")
    self.o_proj = lin(q_out, d, name="o_proj")
    if cfg.family == "gemma3_text":
      self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, gemma=True, dtype=dtype, lead=lead)
      self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, gemma=True, dtype=dtype, lead=lead)
    else:
      self.q_norm = self.k_norm = None

  def project(self, x, cos, sin):
    """Rotated queries `[batch, seq, heads, head_dim]`, rotated keys and values `[batch, seq, kv_heads, head_dim]`."""
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def __call__(self, x, cos, sin, mask, attend_fn: AttendFn | None = None):
    """Attention of `x` `[batch, q, d_model]` over its own keys, or over what `attend_fn` chooses.

    `mask` is `[batch, 1, q, k]` boolean. `attend_fn`, if given, maps this
    call's rotated `(q, k, v)` (see `project`) to `(attention output [batch, q,
    heads, head_dim], aux)`, e.g. attending over a KV cache with `k`, `v`
    written in; without it, aux is `(k, v)`. Returns `(out [batch, q, d_model], aux)`.
    """
    b, t, _ = x.shape
    q, k, v = self.project(x, cos, sin)
    if attend_fn is None:
      out, aux = attend(q, k, v, mask, scale=self.scale, softcap=self.softcap), (k, v)
    else:
      out, aux = attend_fn(q, k, v)
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), aux


class MLP(nnx.Module):
  """Gated MLP: `down(act(gate(x)) * up(x))`."""

  def __init__(self, cfg: TrunkConfig, *, dtype, rngs: nnx.Rngs | None, lead: tuple[int, ...] = ()):
    if cfg.activation not in ACTIVATIONS:
      raise ValueError(f"activation {cfg.activation!r} is not supported; expected one of "
                       f"{', '.join(sorted(ACTIVATIONS))}")
    self.act = ACTIVATIONS[cfg.activation]
    lin = functools.partial(Linear, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs, lead=lead)
    self.gate_proj = lin(cfg.d_model, cfg.ffn_dim, name="gate_proj")
    self.up_proj = lin(cfg.d_model, cfg.ffn_dim, name="up_proj")
    self.down_proj = lin(cfg.ffn_dim, cfg.d_model, name="down_proj")

  def __call__(self, x):
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """Pre-norm decoder block; Gemma 2/3 add post-attention and post-MLP norms."""

  def __init__(self, cfg: TrunkConfig, layer_type: str, *, dtype, rngs: nnx.Rngs | None,
               lead: tuple[int, ...] = ()):
    self.layer_type = layer_type
    norm = lambda: RMSNorm(cfg.d_model, cfg.norm_eps, gemma=cfg.is_gemma, dtype=dtype, lead=lead)
    self.attn_norm = norm()
    self.attn = Attention(cfg, layer_type, dtype=dtype, rngs=rngs, lead=lead)
    self.mlp_norm = norm()
    self.mlp = MLP(cfg, dtype=dtype, rngs=rngs, lead=lead)
    sandwich = cfg.family in ("gemma2", "gemma3_text")
    self.attn_post_norm = norm() if sandwich else None
    self.mlp_post_norm = norm() if sandwich else None

  def __call__(self, x, cos, sin, mask, attend_fn: AttendFn | None = None):
    """Returns `(x, aux)`; see `Attention.__call__` for `attend_fn` and aux."""
    h, aux = self.attn(self.attn_norm(x), cos, sin, mask, attend_fn)
    if self.attn_post_norm is not None:
      h = self.attn_post_norm(h)
    x = x + h
    h = self.mlp(self.mlp_norm(x))
    if self.mlp_post_norm is not None:
      h = self.mlp_post_norm(h)
    return x + h, aux


class LayerGroup(nnx.Module):
  """`reps` repetitions of a layer pattern (`kinds`), starting at decoder layer `start`.

  `layers[j]` is the pattern's j-th layer with every weight stacked over the
  repetitions (leading axis `[reps]`).
  """

  def __init__(self, cfg: TrunkConfig, spec: config_lib.LayerGroup, *, dtype, rngs: nnx.Rngs | None):
    self.start, self.kinds, self.reps = spec.start, spec.kinds, spec.reps
    self.layers = nnx.List([DecoderLayer(cfg, kind, dtype=dtype, rngs=rngs, lead=(spec.reps,))
                            for kind in spec.kinds])

  def unstack(self) -> list[list[Any]]:
    """Each repetition's weights, sliced out once: `[rep][j]` the state of pattern position j.

    For `scan(..., weights=...)`: inside a loop that runs the layers many times
    (a decode loop), the layers then read these arrays directly. XLA:CPU copies
    every slice of a stacked weight before its matrix product, so a scanned step
    copies each weight it reads.
    """
    states = [nnx.split(layer)[1] for layer in self.layers]
    return [[jax.tree.map(lambda a: jax.lax.index_in_dim(a, i, keepdims=False), st) for st in states]
            for i in range(self.reps)]

  def scan(self, fn, carry, xs=None, *, remat: str = "none", weights: list[list[Any]] | None = None):
    """One `jax.lax.scan` over the repetitions.

    In each repetition, for each pattern position j in turn,
    `fn(j, layer, carry, x) -> (carry, y)` runs with `layer` the j-th
    `DecoderLayer` holding that repetition's weights and `x` the repetition's
    slice of `xs[j]` (None when `xs` is None). Each call is rematerialized by
    the policy `remat` (see `REMAT_POLICIES`). Returns `(carry, ys)`, `ys[j]`
    stacked over the repetitions.

    With `weights` (see `unstack`) the repetitions run one after another, unrolled,
    on those weights, with `x` sliced from numpy `xs` at a constant index.
    """
    if weights is not None:
      graphdefs = [nnx.graphdef(layer) for layer in self.layers]
      xs = [None] * len(graphdefs) if xs is None else list(xs)
      ys = []
      for i, states in enumerate(weights):
        y = []
        for j, (graphdef, state) in enumerate(zip(graphdefs, states)):
          carry, out = fn(j, nnx.merge(graphdef, state), carry, None if xs[j] is None else xs[j][i])
          y.append(out)
        ys.append(y)
      return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)
    splits = [nnx.split(layer) for layer in self.layers]
    policy = REMAT_POLICIES[remat]
    stacked = [state for _, state in splits]

    def position(j):
      graphdef = splits[j][0]

      def f(i, c, x):
        # The repetition's weights are sliced here, inside the rematerialized call: as a
        # scanned input they would be its residuals, and the forward pass would stack a
        # copy of every layer's weights for the backward one.
        state = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stacked[j])
        return fn(j, nnx.merge(graphdef, state), c, x)

      return f if remat == "none" else jax.checkpoint(f, policy=policy, prevent_cse=False)

    steps = [position(j) for j in range(len(splits))]

    def body(c, inputs):
      i, x = inputs
      ys = []
      for j, step in enumerate(steps):
        c, y = step(i, c, x[j])
        ys.append(y)
      return c, ys

    xs = [None] * len(splits) if xs is None else list(xs)
    return jax.lax.scan(body, carry, (jnp.arange(self.reps), xs))


def _auto_axes(method):
  """Runs `method` with the context mesh's axes `Auto`.

  A sharded trunk's weights are laid out for XLA's sharding propagation (see
  `persomux.sharding.auto_mesh`); inside `jax.set_mesh` of a mesh with
  explicit axes (`jax.make_mesh`'s default) its ops would otherwise have to
  state their output shardings.
  """

  @functools.wraps(method)
  def wrapped(*args, **kwargs):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types):
      return method(*args, **kwargs)
    with jax.sharding.use_abstract_mesh(mesh.update_axis_types(
        {a: jax.sharding.AxisType.Auto for a in mesh.axis_names})):
      return method(*args, **kwargs)

  return wrapped


@_auto_axes
def head_logits(norm, w: jax.Array, h: jax.Array, softcap: float | None) -> jax.Array:
  """`Trunk.logits` from its parts: the final `norm`, the head `w` `[vocab, d]` and the soft cap."""
  logits = linear(norm(h), w).astype(jnp.float32)
  if softcap:
    logits = jnp.tanh(logits / softcap) * softcap
  return logits


class Trunk(nnx.Module):
  """A decoder-only language model.

  Call with `input_ids` `[batch, seq]` or `inputs_embeds` `[batch, seq, d_model]`
  (already scaled, as `embed` returns them), an optional `attention_mask`
  `[batch, seq]` (1 = real token) and optional `positions` `[batch, seq]`
  (default: 0..seq-1). Returns logits `[batch, seq, vocab]` in float32.

  `remat` is a `REMAT_POLICIES` name or a bool (True = "full", False = "none").
  """

  def __init__(self, cfg: TrunkConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
               remat: bool | str = "none"):
    self.config = cfg
    self.dtype = jnp.dtype(dtype)
    self.remat = remat_policy(remat)
    self.embed_tokens = _weight(rngs, (cfg.vocab_size, cfg.d_model), dtype)
    self.groups = nnx.List([LayerGroup(cfg, spec, dtype=dtype, rngs=rngs) for spec in cfg.layer_groups])
    self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, gemma=cfg.is_gemma, dtype=dtype)
    self.lm_head = None if cfg.tie_embeddings else _weight(rngs, (cfg.vocab_size, cfg.d_model), dtype)

  @_auto_axes
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
    return head_logits(self.norm, self.head_weight(), h, self.config.final_softcap)

  def head_weight(self) -> jax.Array:
    """The LM head `[vocab, d_model]`: the embedding when they are tied."""
    return (self.embed_tokens if self.lm_head is None else self.lm_head)[...]

  @_auto_axes
  def hidden_states(self, inputs_embeds, attention_mask=None, positions=None) -> jax.Array:
    """Runs the decoder layers; returns the last hidden states before the final norm."""
    b, t, _ = inputs_embeds.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    tables = self.rope_tables(positions)
    masks = self.masks(positions, positions, attention_mask)

    def layer(j, module, h, _):
      cos, sin = tables[module.layer_type]
      return module(h, cos, sin, masks[module.layer_type])[0], None

    h = inputs_embeds.astype(self.dtype)
    for group in self.groups:
      h, _ = group.scan(layer, h, remat=self.remat)
    return h

  @_auto_axes
  def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, positions=None):
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
      inputs_embeds = self.embed(input_ids)
    return self.logits(self.hidden_states(inputs_embeds, attention_mask, positions))
