"""Sampling: prefill, then decode over a preallocated KV cache inside jit.

Each row may carry its own soft prompt (its own persona and bias scale).
Prompts are right-padded; each row keeps its own write position, so rotary
positions count real tokens only. Full-attention layers cache every
position; sliding-window layers keep a ring buffer of `sliding_window`
slots. Every cache slot remembers the position it holds (-1 when empty),
which is all the masks need. Prompt lengths and generation lengths are
padded to buckets so new lengths do not recompile.

Prefill and decode scan over the trunk's layer groups like training does;
the KV caches are stacked per group and position in the group's pattern
and ride in the decode scan's carry, so each step writes its token in place.
Values are `[reps, batch, kv_heads, slots, head_dim]`; on CPU keys are
stored in blocks of 64 slots, each block transposed, `[reps, batch,
kv_heads, slots / 64, head_dim, 64]`, so a step's scores `q . k` read the
keys in one pass (XLA's CPU product against keys laid out like values ran
at a sixth of the speed, and against keys transposed whole at half), and
elsewhere like the values (`KEY_BLOCK`). A decode step attends over
only the filled part of each cache (the smallest power-of-two span, from
`MIN_SPAN` slots, that holds every row's positions).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from persomux import prompts as prompts_lib
from persomux import sharding as sharding_lib
from persomux.models.config import SLIDING
from persomux.models import modeling
from persomux.models.modeling import cache_attention

SOFT_MARKER = "<|soft|>"  # where a prompt string wants its soft tokens


@dataclasses.dataclass
class SoftPrompts:
  """A prompt module with one class id (and bias scale) per row."""

  module: Any
  class_ids: Sequence[int]
  bias_scale: float | Sequence[float] = 1.0


@dataclasses.dataclass
class LogitStreams:
  """Extra logit streams combined with the generator's at every step (e.g. Drift).

  Row r of the batch has `S` streams: prompts `ids[r][s]` for `model`, a small
  LM that shares the generator's vocabulary, each with its own KV cache and
  each fed every generated token of row r. Stream 0 is the base; at each step

      logits[r] = generator[r] + (1 / beta) * Σ_{s>=1} weights[r, s-1] * (stream_s[r] − stream_0[r]).

  A row whose weights are all 0 gets exactly the generator's logits.
  """

  model: Any
  ids: Sequence[Sequence[Sequence[int]]]  # [B][S] token ids
  weights: Any  # [B, S - 1]
  beta: float = 0.5


def _streams_input(streams: LogitStreams, bsz: int):
  """`(embeds [B*S, T, d], mask [B*S, T], weights [B, S-1])` of `streams`, T a bucket."""
  if len(streams.ids) != bsz or len({len(r) for r in streams.ids}) != 1:
    raise ValueError(f"logit streams: {len(streams.ids)} rows of streams for {bsz} prompts; expected one row "
                     "per prompt, each with the same number of streams")
  flat = [list(x) for row in streams.ids for x in row]
  t = bucket(max(len(x) for x in flat))
  ids = np.zeros((len(flat), t), np.int32)
  mask = np.zeros((len(flat), t), np.int32)
  for i, x in enumerate(flat):
    ids[i, :len(x)] = x
    mask[i, :len(x)] = 1
  weights = np.asarray(streams.weights, np.float32).reshape(bsz, len(streams.ids[0]) - 1)
  return streams.model.embed(jnp.asarray(ids)), jnp.asarray(mask), jnp.asarray(weights)


def combine_logits(logits, stream_logits, weights, beta):
  """`logits [B, V] + (1/beta) Σ_s weights[:, s] (stream_logits[:, s+1] − stream_logits[:, 0])`,
  with `stream_logits` `[B, S, V]`."""
  diff = stream_logits[:, 1:] - stream_logits[:, :1]
  return logits + jnp.einsum("bs,bsv->bv", weights, diff) / beta


def bucket(n: int, minimum: int = 16) -> int:
  """Smallest power of two >= max(n, minimum)."""
  b = minimum
  while b < n:
    b *= 2
  return b


MIN_SPAN = 64  # the fewest cache slots a decode step attends over
# Keys are cached in blocks of this many slots, each block transposed (`[..., slots / KEY_BLOCK,
# head_dim, KEY_BLOCK]`), or laid out like the values (0); None: 64 on CPU, 0 elsewhere. A divisor
# of MIN_SPAN, so every span is whole blocks; caches round their slots up to whole blocks.
# On XLA's CPU backend the decode step's score product against keys laid out like values ran at a
# sixth of the speed. Transposed whole (`[..., head_dim, slots]`), the product reads each head_dim
# row of the keys as its own strided stream: the 8-row attention of the benchmark trunk over 576
# slots took 679 us per layer, and 459 us with 64-slot blocks, whose scores are a sum of products
# over each contiguous block. On a TPU compile the transposed keys' per-row slot writes added a
# copy of the key cache (Llama-3-8B decode, 64 rows x 4,096 on tensor:8: 7.92 GiB per device
# against 5.91).
KEY_BLOCK: int | None = None


# Whether the decode loop runs its layers unrolled, on weights and KV caches sliced per layer once
# before the loop (`LayerGroup.unstack`); None: on CPU only. XLA:CPU copies every slice of a stacked
# array before a matrix product, so a scanned decode step copies all its layer weights, and each
# layer's span of the stacked KV cache, at every step; unrolled, it reads them in place, at a
# longer compile (one copy of the layer per layer) and a second copy of the layer weights while
# the loop runs. Elsewhere a scanned step's dynamic slices feed the products directly.
DECODE_UNROLLED: bool | None = None


def key_block() -> int:
  """The key cache's block (see `KEY_BLOCK`) for caches built now; 0: keys like the values.
  Read at trace time."""
  block = (64 if jax.default_backend() == "cpu" else 0) if KEY_BLOCK is None else KEY_BLOCK
  if block < 0 or (block and MIN_SPAN % block):
    raise ValueError(f"sampling.KEY_BLOCK={block}: expected 0 or a divisor of MIN_SPAN={MIN_SPAN}")
  return block


def decode_unrolled() -> bool:
  """Whether decode loops traced now run unrolled (see `DECODE_UNROLLED`)."""
  return jax.default_backend() == "cpu" if DECODE_UNROLLED is None else DECODE_UNROLLED


def _cache_len(model, kind: str, total: int) -> int:
  """Slots of a `kind` cache for `total` positions: a sliding window's ring or all of them,
  rounded up to whole key blocks (a ring longer than its window still masks by the window)."""
  w = model.config.sliding_window
  n = min(w, total) if (kind == SLIDING and w) else total
  block = key_block()
  return -(-n // block) * block if block else n


def _key_cache(values, block: int):
  """An empty key cache for value caches shaped like `values` (`[..., slots, head_dim]`)."""
  if not block:
    return values
  *lead, slots, h = values.shape
  return jnp.zeros((*lead, slots // block, h, block), values.dtype)


def _key_index(slot, block: int) -> tuple:
  """The index, after the leading `[..., rows, kv_heads]` ones, of cache slots `slot` in keys."""
  return (slot // block, slice(None), slot % block) if block else (slot,)


def init_caches(model, batch: int, total: int):
  """Empty caches of `batch` rows for `total` positions.

  `{"pos": {kind: [batch, slots]}, "layers": [group][position] -> {"k", "v"}}`:
  the position each slot holds (-1: empty) per attention kind, and per layer
  group and position in its pattern the values `[reps, batch, kv_heads, slots,
  head_dim]` and the keys, laid out like the values or, where `key_block()`
  is a block B, as `[reps, batch, kv_heads, slots / B, head_dim, B]`.
  """
  cfg = model.config
  size = {kind: _cache_len(model, kind, total) for kind in set(cfg.layer_types)}
  v = lambda reps, kind: jnp.zeros((reps, batch, cfg.num_kv_heads, size[kind], cfg.head_dim), model.dtype)
  block = key_block()
  return {"pos": {kind: jnp.full((batch, n), -1, jnp.int32) for kind, n in size.items()},
          "layers": [[{"k": _key_cache(v(g.reps, kind), block), "v": v(g.reps, kind)} for kind in g.kinds]
                     for g in cfg.layer_groups]}


def insert_rows(caches, rows, start):
  """`caches` with the caches `rows` (of fewer rows, same slots, stacked as `init_caches` makes
  them) written over rows `start...`; `caches` may be in `unstack_caches`' layout."""
  put = lambda axis: lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r, start, axis=axis)
  unstacked = isinstance(caches["layers"][0][0]["v"], tuple)
  if unstacked:
    rows = unstack_caches(rows)
  return {"pos": jax.tree.map(put(0), caches["pos"], rows["pos"]),
          "layers": jax.tree.map(put(0 if unstacked else 1), caches["layers"], rows["layers"])}


def _cache_mask(cache_pos, q_pos, window):
  """`[B, 1, q, S]` mask over cache slots for queries at `q_pos` `[B, q]`."""
  kp = cache_pos[:, None, :]
  qp = q_pos[:, :, None]
  m = (kp >= 0) & (kp <= qp)
  if window is not None:
    m &= kp > qp - window
  return m[:, None]


def _spans(size: int, copied: bool = False) -> list[int]:
  """Cache spans a decode step may attend over: powers of two from MIN_SPAN, then `size`.
  `copied`: a span is a copy of its slots (an unrolled step's static slice), worth it only up to
  a third of the cache (copying reads and writes it, and the step reads the copy)."""
  spans, s = [], MIN_SPAN
  while (3 * s <= size) if copied else (s < size):
    spans.append(s)
    s *= 2
  return spans + [size]


def _attend_cache(attn, q, k_cache, v_cache, rep, cache_pos, q_pos, window):
  """One new query per row `q` `[B, 1, heads, head_dim]` over repetition `rep` of the
  stacked caches (see `init_caches`), or over one layer's caches (`rep` None: no leading
  `[reps]` axis), reading only the smallest span of slots that holds every row's filled ones."""
  b, kv, size, h = v_cache.shape[-4:]
  block = key_block()
  filled = jnp.minimum(jnp.max(q_pos) + 1, size)  # slots fill from 0, rings wrap once full

  def over(span):
    # The first `span` slots: of the values, and of the keys (`span / block` whole blocks).
    k_shape = (b, kv, span // block, h, block) if block else (b, kv, span, h)

    def f(q, k_cache, v_cache, cache_pos):
      if rep is None:
        k, v = k_cache[:, :, :k_shape[2]], v_cache[:, :, :span]
      else:
        k = jax.lax.dynamic_slice(k_cache, (rep,) + (0,) * len(k_shape), (1,) + k_shape)[0]
        v = jax.lax.dynamic_slice(v_cache, (rep, 0, 0, 0, 0), (1, b, kv, span, h))[0]
      mask = _cache_mask(cache_pos[:, :span], q_pos[:, None], window)
      return cache_attention(q, k, v, mask, scale=attn.scale, softcap=attn.softcap, key_block=block)
    return f

  spans = _spans(size, copied=rep is None)
  args = (q, k_cache, v_cache, cache_pos)
  if len(spans) == 1:
    return over(spans[0])(*args)
  index = jnp.sum(jnp.asarray(spans[:-1]) < filled)
  return jax.lax.switch(index, [over(s) for s in spans], *args)


def _first_max(x):
  """Per row of `x` `[B, n]`, the index of its first maximum (of its first NaN, as `jnp.argmax`)."""
  n = x.shape[-1]
  nan = jnp.isnan(x)
  hit = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, x == jnp.max(x, axis=-1, keepdims=True))
  return jnp.min(jnp.where(hit, jnp.arange(n, dtype=jnp.int32), n), axis=-1)


def argmax(logits, block: int = 128):
  """`jnp.argmax(logits, axis=-1)` of `[B, V]` logits, as int32: the best of each block of
  `block` logits, then the best within the best block. Plain reductions: XLA's CPU argmax
  (one reduction of value-index pairs) took 0.7 ms over 8 rows of a 32,000-token vocabulary,
  single-threaded; this takes under 0.05 ms."""
  b, v = logits.shape
  x = jnp.pad(logits, ((0, 0), (0, -v % block)), constant_values=-jnp.inf) if v % block else logits
  blocks = x.reshape(b, -1, block)
  # A block's best is NaN where it holds one (XLA's CPU max may skip NaNs).
  best = _first_max(jnp.where(jnp.any(jnp.isnan(blocks), axis=-1), jnp.nan, jnp.max(blocks, axis=-1)))
  within = _first_max(jnp.take_along_axis(blocks, best[:, None, None], axis=1)[:, 0])
  return best * block + within


def _sample(logits, rng, temperature, top_k, top_p):
  """Next tokens `[B]` from logits `[B, V]` (greedy when temperature == 0)."""
  if temperature == 0.0:
    return argmax(logits)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always the best token).
    keep_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _model_mesh(model):
  """The mesh `model`'s weights are sharded over, or None (one device)."""
  sharding = getattr(model.embed_tokens[...], "sharding", None)
  return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def prefill_caches(model, embeds, mask, total: int, mesh=None):
  """Runs `embeds` `[B, S, d]` (real tokens first, `mask` 1 on them) through the
  trunk into fresh caches (see `init_caches`) sized for `total` positions;
  returns `(caches, next-token logits [B, V], lengths [B])`. With a `mesh`,
  the caches shard kv heads over `tensor` and rows over the batch axes."""
  cfg = model.config
  b, s, _ = embeds.shape
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  lengths = mask.sum(-1).astype(jnp.int32)
  tables = model.rope_tables(positions)
  masks = model.masks(positions, positions, mask)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, s))
  size = {kind: _cache_len(model, kind, total) for kind in set(cfg.layer_types)}
  block = key_block()
  # Only the last `size` real tokens fit a ring buffer; padding never enters (dropped slots).
  slot = {kind: jnp.where(mask.astype(bool) & (positions >= lengths[:, None] - n), positions % n, n)
          for kind, n in size.items()}
  pos = {kind: jnp.full((b, n), -1, jnp.int32).at[rows, slot[kind]].set(positions, mode="drop")
         for kind, n in size.items()}

  def layer(j, module, h, _):
    kind = module.layer_type
    cos, sin = tables[kind]
    h, (k, v) = module(h, cos, sin, masks[kind])
    empty = jnp.zeros((b, cfg.num_kv_heads, size[kind], cfg.head_dim), model.dtype)
    put_v = lambda x: empty.at[rows, :, slot[kind]].set(x.astype(model.dtype), mode="drop")
    put_k = lambda x: _key_cache(empty, block).at[(rows, slice(None)) + _key_index(slot[kind], block)].set(
        x.astype(model.dtype), mode="drop")
    return h, {"k": put_k(k), "v": put_v(v)}

  h = embeds.astype(model.dtype)
  layers = []
  for group in model.groups:
    h, kv = group.scan(layer, h)
    if mesh is not None:
      kv = jax.tree.map(lambda c: jax.lax.with_sharding_constraint(
          c, NamedSharding(mesh, sharding_lib.cache_spec(c.shape, mesh))), kv)
    layers.append(kv)
  last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)
  return {"pos": pos, "layers": layers}, model.logits(last)[:, 0], lengths


def unstack_layers(model):
  """Each layer group's weights sliced out once (`LayerGroup.unstack`): `decode_step`'s `weights`."""
  return [group.unstack() for group in model.groups]


def unstack_caches(caches):
  """`caches` (see `init_caches`) with each stacked `[reps, ...]` key and value split into a
  tuple of per-layer arrays, the layout `decode_step` takes with `weights`."""
  split = lambda a: tuple(jax.lax.index_in_dim(a, i, keepdims=False) for i in range(a.shape[0]))
  return {"pos": caches["pos"], "layers": [[{n: split(a) for n, a in c.items()} for c in group]
                                           for group in caches["layers"]]}


def stack_caches(caches):
  """The inverse of `unstack_caches`."""
  return {"pos": caches["pos"], "layers": [[{n: jnp.stack(a) for n, a in c.items()} for c in group]
                                           for group in caches["layers"]]}


def decode_step(model, caches, tokens, pos, weights=None):
  """Feeds `tokens` `[B]` at positions `pos` `[B]`, each row over its own caches
  (see `init_caches`); returns `(caches, next-token logits [B, V])`.

  `weights`: per layer group, its `LayerGroup.unstack()`; the layers then run
  unrolled on those weights, and `caches` are in `unstack_caches`' layout."""
  with modeling.few_row_products():
    return _decode_step(model, caches, tokens, pos, weights)


def _decode_step(model, caches, tokens, pos, weights):
  cfg = model.config
  rows = jnp.arange(tokens.shape[0])
  x = model.embed(tokens[:, None])
  tables = model.rope_tables(pos[:, None])
  slot = {kind: pos % p.shape[1] for kind, p in caches["pos"].items()}
  block = key_block()
  new_pos = {kind: p.at[rows, slot[kind]].set(pos) for kind, p in caches["pos"].items()}

  def layer(j, module, carry, rep):
    h, kv = carry
    kind = module.layer_type
    cos, sin = tables[kind]
    window = cfg.sliding_window if kind == SLIDING else None
    # This layer's caches: its own arrays (unrolled), or the stacked ones at repetition `rep`.
    k_cache, v_cache, at = ((kv[j]["k"][rep], kv[j]["v"][rep], ()) if weights is not None else
                            (kv[j]["k"], kv[j]["v"], (rep,)))

    def attend_fn(q, k, v):
      # Each row's new key and value go to its own slot, in place in the carried cache.
      keys = at + (rows, slice(None)) + _key_index(slot[kind], block)
      kc = k_cache.at[keys].set(k[:, 0].astype(k_cache.dtype))
      vc = v_cache.at[at + (rows, slice(None), slot[kind])].set(v[:, 0].astype(v_cache.dtype))
      out = _attend_cache(module.attn, q, kc, vc, None if weights is not None else rep, new_pos[kind], pos, window)
      if weights is not None:  # back into this layer's place in the tuples
        kc, vc = (tuple(c if i != rep else n for i, c in enumerate(kv[j][name])) for name, n in (("k", kc), ("v", vc)))
      return out, {"k": kc, "v": vc}

    h, new = module(h, cos, sin, None, attend_fn)
    return (h, kv[:j] + [new] + kv[j + 1:]), None

  layers = []
  for g, (group, kv) in enumerate(zip(model.groups, caches["layers"])):
    # Unrolled, each repetition's index is a constant (numpy), so its cache is a tuple entry.
    reps = np.arange(group.reps) if weights is not None else jnp.arange(group.reps)
    (x, kv), _ = group.scan(layer, (x, list(kv)), xs=[reps] * len(group.kinds),
                            weights=None if weights is None else weights[g])
    layers.append(kv)
  return {"pos": new_pos, "layers": layers}, model.logits(x)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "sgraphdef", "beta", "mesh"))
def _prefill(graphdef, state, embeds, mask, rng, streams=None, *, max_new, sgraphdef=None, beta=1.0, mesh=None):
  """Prefills `embeds` `[B, S, d]` into caches for S + `max_new` positions (and the
  logit streams' prompts into theirs); returns the decode carry (see `_decode`).
  `mesh`: the trunk's, to shard its caches (see `prefill_caches`)."""
  model = nnx.merge(graphdef, state)
  b, s, _ = embeds.shape
  caches, logits, lengths = prefill_caches(model, embeds, mask, s + max_new, mesh)
  carry = {"i": jnp.int32(0), "done": jnp.zeros((b,), bool), "out": jnp.zeros((b, max_new), jnp.int32),
           "caches": caches, "logits": logits, "rng": rng, "lengths": lengths}
  if streams is not None:
    small = nnx.merge(sgraphdef, streams["state"])
    s_caches, s_logits, s_lengths = prefill_caches(small, streams["embeds"], streams["mask"],
                                                   streams["embeds"].shape[1] + max_new)
    w = streams["weights"]
    carry["logits"] = combine_logits(logits, s_logits.reshape(b, -1, s_logits.shape[-1]), w, beta)
    carry["streams"] = {"caches": s_caches, "lengths": s_lengths, "weights": w}
  return carry


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "top_k", "top_p", "sgraphdef", "beta"),
                   donate_argnames=("carry",))
def _decode(graphdef, state, carry, eos_ids, limit, sstate=None, *, temperature, top_k, top_p, sgraphdef=None,
            beta=1.0):
  """Decodes until step `limit` or until every row is done; returns the carry.

  The carry holds the step `i`, per-row `done` flags, the tokens so far
  `out` `[B, max_new]` (0 after a row is done), the caches, the next-token
  logits, the PRNG key and the prompt `lengths`.
  """
  model = nnx.merge(graphdef, state)
  lengths = carry["lengths"]
  b = lengths.shape[0]
  # Unrolled (see `DECODE_UNROLLED`): the layers' weights and caches are sliced once, here.
  small = nnx.merge(sgraphdef, sstate) if "streams" in carry else None
  weights = unstack_layers(model) if decode_unrolled() else None
  sweights = None
  if weights is not None:
    carry = dict(carry, caches=unstack_caches(carry["caches"]))
    if small is not None:  # Drift's small LM runs its layers the same way
      sweights = unstack_layers(small)
      carry["streams"] = dict(carry["streams"], caches=unstack_caches(carry["streams"]["caches"]))

  def body(c):
    rng, sub = jax.random.split(c["rng"])
    nxt = _sample(c["logits"], sub, temperature, top_k, top_p)
    nxt = jnp.where(c["done"], 0, nxt)
    i = c["i"]
    caches, logits = decode_step(model, c["caches"], nxt, lengths + i, weights)
    out = {"i": i + 1, "done": c["done"] | jnp.isin(nxt, eos_ids), "out": c["out"].at[:, i].set(nxt),
           "caches": caches, "logits": logits, "rng": rng, "lengths": lengths}
    if "streams" in c:
      st = c["streams"]
      per_row = st["lengths"].shape[0] // b
      s_caches, s_logits = decode_step(small, st["caches"], jnp.repeat(nxt, per_row), st["lengths"] + i, sweights)
      out["logits"] = combine_logits(logits, s_logits.reshape(b, per_row, -1), st["weights"], beta)
      out["streams"] = dict(st, caches=s_caches)
    return out

  def cond(c):
    return (c["i"] < limit) & ~jnp.all(c["done"])

  carry = jax.lax.while_loop(cond, body, carry)
  if weights is None:
    return carry
  carry = dict(carry, caches=stack_caches(carry["caches"]))
  if sweights is not None:
    carry["streams"] = dict(carry["streams"], caches=stack_caches(carry["streams"]["caches"]))
  return carry


def _encode(tokenizer, prompt: str) -> tuple[list[int], int]:
  """Token ids of `prompt` and the soft-token index (marker position, or after BOS)."""
  if SOFT_MARKER in prompt:
    before, after = prompt.split(SOFT_MARKER, 1)
    pre = tokenizer(before, add_special_tokens=True)["input_ids"] if before else \
        tokenizer("", add_special_tokens=True)["input_ids"]
    post = tokenizer(after, add_special_tokens=False)["input_ids"]
    return pre + post, len(pre)
  ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
  bos = tokenizer.bos_token_id
  return ids, 1 if (bos is not None and ids and ids[0] == bos) else 0


def _eos_ids(model, tokenizer) -> np.ndarray:
  ids = set()
  for e in (tokenizer.eos_token_id if tokenizer is not None else None, model.config.eos_token_id):
    if isinstance(e, int):
      ids.add(e)
    elif isinstance(e, (list, tuple)):
      ids.update(int(x) for x in e)
  return np.array(sorted(ids) or [-1], np.int32)


def _soft_tokens(soft_prompts, bsz: int):
  """`(soft [B, P, d], soft_len [B])` from any accepted `soft_prompts` form."""
  if isinstance(soft_prompts, SoftPrompts):
    scales = np.broadcast_to(np.asarray(soft_prompts.bias_scale, np.float32), (bsz,))
    return soft_prompts.module(jnp.asarray(np.asarray(soft_prompts.class_ids, np.int32)), jnp.asarray(scales))
  if isinstance(soft_prompts, tuple):
    soft, soft_len = soft_prompts
    return jnp.asarray(soft), jnp.asarray(soft_len, jnp.int32)
  soft = jnp.asarray(soft_prompts)
  return soft, jnp.full((bsz,), soft.shape[1], jnp.int32)


def start_decoding(model, input_ids: np.ndarray, lengths: np.ndarray | None = None, *, max_new_tokens: int,
                   soft_prompts=None, soft_index: np.ndarray | None = None, eos_ids: Sequence[int] = (),
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                   logit_streams: LogitStreams | None = None):
  """`generate_ids`' prefill: `(carry, decode)`, the decode carry after the prompts and
  `decode(carry, limit=...)`, which decodes until step `limit` (at most `max_new_tokens`) or
  until every row is done and returns the carry (it donates the carry it is given); the
  tokens so far are `carry["out"]` `[B, bucket(max_new_tokens)]`."""
  input_ids = np.asarray(input_ids, np.int32)
  b, t = input_ids.shape
  lengths = np.full((b,), t, np.int32) if lengths is None else np.asarray(lengths, np.int32)
  t_b = bucket(t)
  ids = np.zeros((b, t_b), np.int32)
  ids[:, :t] = input_ids
  am = (np.arange(t_b)[None, :] < lengths[:, None]).astype(np.int32)
  embeds = model.embed(jnp.asarray(ids))
  mask = jnp.asarray(am)
  if soft_prompts is not None:
    soft, soft_len = _soft_tokens(soft_prompts, b)
    index = np.zeros((b,), np.int32) if soft_index is None else np.asarray(soft_index, np.int32)
    embeds, mask, _, _ = prompts_lib.splice(embeds, mask, soft, soft_len, jnp.asarray(index))
    # Every row's real tokens (left-aligned) fit the longest prompt plus P soft tokens: the bucket
    # of that, not of the padded length (a 428-token prompt and 20 soft tokens: 512, not 1024).
    s_b = bucket(int(lengths.max()) + soft.shape[1])
    keep = min(s_b, embeds.shape[1])
    embeds = jnp.pad(embeds[:, :keep], ((0, 0), (0, s_b - keep), (0, 0)))
    mask = jnp.pad(mask[:, :keep], ((0, 0), (0, s_b - keep)))
  graphdef, state = nnx.split(model)
  stream_kw, streams, sstate = {}, None, None
  if logit_streams is not None:
    sgraphdef, sstate = nnx.split(logit_streams.model)
    s_embeds, s_mask, weights = _streams_input(logit_streams, b)
    streams = {"state": sstate, "embeds": s_embeds, "mask": s_mask, "weights": weights}
    stream_kw = {"sgraphdef": sgraphdef, "beta": float(logit_streams.beta)}
  carry = _prefill(graphdef, state, embeds, mask, jax.random.key(seed), streams, max_new=bucket(max_new_tokens),
                   mesh=_model_mesh(model), **stream_kw)
  eos = jnp.asarray(np.array(list(eos_ids) or [-1], np.int32))
  decode = functools.partial(_decode, graphdef, state, eos_ids=eos, sstate=sstate, temperature=float(temperature),
                             top_k=top_k, top_p=top_p, **stream_kw)
  return carry, decode


def generate_ids(model, input_ids: np.ndarray, lengths: np.ndarray | None = None, *, max_new_tokens: int,
                 soft_prompts=None, soft_index: np.ndarray | None = None, eos_ids: Sequence[int] = (),
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, stop_fn=None, stop_chunk: int = 8,
                 logit_streams: LogitStreams | None = None) -> np.ndarray:
  """Token-level generation.

  Args:
    input_ids: `[B, T]` right-padded prompt tokens; `lengths` `[B]` real lengths
      (default: all T).
    soft_prompts: see `generate`; inserted before `soft_index` `[B]` (default 0).
    eos_ids: tokens that end a row.
    stop_fn: optional `tokens [B, n] -> bool [B]`, called every `stop_chunk`
      steps; rows it flags stop decoding (e.g. a stop string appeared).
    logit_streams: optional `LogitStreams` combined with the logits at every
      step (Drift decoding); None decodes exactly as without.

  Returns:
    `[B, max_new_tokens]` int32; a row is 0 after its EOS.
  """
  carry, decode = start_decoding(model, input_ids, lengths, max_new_tokens=max_new_tokens, soft_prompts=soft_prompts,
                                 soft_index=soft_index, eos_ids=eos_ids, temperature=temperature, top_k=top_k,
                                 top_p=top_p, seed=seed, logit_streams=logit_streams)
  if stop_fn is None:
    carry = decode(carry, limit=jnp.int32(max_new_tokens))
  else:
    # Decode in chunks; between chunks the host marks rows whose text hit a stop string.
    while True:
      carry = decode(carry, limit=jnp.int32(min(int(carry["i"]) + stop_chunk, max_new_tokens)))
      i = int(carry["i"])
      done = np.asarray(carry["done"]) | np.asarray(stop_fn(np.asarray(carry["out"])[:, :i]), bool)
      carry["done"] = jnp.asarray(done)
      if done.all() or i >= max_new_tokens:
        break
  return np.asarray(jax.device_get(carry["out"]))[:, :max_new_tokens]


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             soft_prompts: SoftPrompts | Any | None = None, stop: Sequence[str] | None = None,
             logit_streams: LogitStreams | None = None) -> list[str]:
  """Generates a continuation of each prompt; returns them without the prompt.

  Args:
    model: a `Trunk`.
    tokenizer: its Hugging Face tokenizer.
    prompts: strings. A prompt may contain `SOFT_MARKER` where its soft tokens
      go; otherwise they go at the start (after BOS).
    max_new_tokens: the most tokens to generate per row.
    temperature: 0 is greedy.
    top_k, top_p: optional truncation of the sampling distribution.
    seed: PRNG seed; the same seed gives the same samples.
    soft_prompts: None; a `SoftPrompts(module, class_ids, bias_scale)` with
      one class id (and optionally one bias scale) per row; or per-row soft
      embeddings `[batch, P, d]` (a `(embeds, lengths)` pair for ragged rows).
    stop: strings that end a row's continuation (the stop string is cut).
    logit_streams: e.g. `persomux.drift.streams(...)`: Drift decoding, each row
      steered by its own user's weights (rows with none decode as without).
  """
  return generate_rows(model, tokenizer, [_encode(tokenizer, p) for p in prompts], max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, soft_prompts=soft_prompts,
                       stop=stop, logit_streams=logit_streams)


def generate_rows(model, tokenizer, rows: Sequence[tuple[Sequence[int], int]], *, max_new_tokens: int,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int = 0, soft_prompts=None, stop: Sequence[str] | None = None,
                  logit_streams: LogitStreams | None = None) -> list[str]:
  """`generate` for prompts already tokenized as `(ids, soft_index)` rows."""
  t = max(len(ids) for ids, _ in rows)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  ids = np.full((len(rows), t), pad, np.int32)
  for r, (row, _) in enumerate(rows):
    ids[r, :len(row)] = row
  eos = _eos_ids(model, tokenizer)
  eos_set = set(eos.tolist())
  stops = [s for s in stop or () if s]

  def text_of(row) -> str:
    toks = []
    for tok in row.tolist():
      if tok in eos_set:
        break
      toks.append(tok)
    return tokenizer.decode(toks, skip_special_tokens=True)

  stop_fn = (lambda out: [any(s in text_of(r) for s in stops) for r in out]) if stops else None
  out = generate_ids(model, ids, np.array([len(r) for r, _ in rows]), max_new_tokens=max_new_tokens,
                     soft_prompts=soft_prompts, soft_index=np.array([si for _, si in rows]),
                     eos_ids=eos.tolist(), temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                     stop_fn=stop_fn, logit_streams=logit_streams)
  texts = []
  for row in out:
    text = text_of(row)
    for s in stops:
      if s in text:
        text = text[:text.index(s)]
    texts.append(text)
  return texts
