"""Sampling: prefill, then decode over a preallocated KV cache inside jit.

Each row may carry its own soft prompt (its own persona and bias scale).
Prompts are right-padded; each row keeps its own write position, so rotary
positions count real tokens only. Full-attention layers cache every
position; sliding-window layers keep a ring buffer of `sliding_window`
slots. Every cache slot remembers the position it holds (-1 when empty),
which is all the masks need. Prompt lengths and generation lengths are
padded to buckets so new lengths do not recompile.
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

from persomux import prompts as prompts_lib
from persomux.models.config import SLIDING

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


def _cache_len(model, kind: str, total: int) -> int:
  w = model.config.sliding_window
  return min(w, total) if (kind == SLIDING and w) else total


def _write(cache, k, v, pos, ok):
  """Writes keys/values `[B, KV, T, H]` at positions `pos` `[B, T]` where `ok`."""
  size = cache["pos"].shape[1]
  slot = jnp.where(ok, pos % size, size)  # out-of-range slots are dropped
  b = jnp.broadcast_to(jnp.arange(pos.shape[0])[:, None], pos.shape)
  put = lambda c, x: c.at[b, :, slot].set(x.astype(c.dtype).transpose(0, 2, 1, 3), mode="drop")
  return {"k": put(cache["k"], k), "v": put(cache["v"], v),
          "pos": cache["pos"].at[b, slot].set(pos, mode="drop")}


def _cache_mask(cache_pos, q_pos, window):
  """`[B, 1, q, S]` mask over cache slots for queries at `q_pos` `[B, q]`."""
  kp = cache_pos[:, None, :]
  qp = q_pos[:, :, None]
  m = (kp >= 0) & (kp <= qp)
  if window is not None:
    m &= kp > qp - window
  return m[:, None]


def _sample(logits, rng, temperature, top_k, top_p):
  """Next tokens `[B]` from logits `[B, V]` (greedy when temperature == 0)."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
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


def prefill_caches(model, embeds, mask, total: int):
  """Runs `embeds` `[B, S, d]` (real tokens first, `mask` 1 on them) through the
  trunk into fresh caches sized for `total` positions; returns
  `(caches, next-token logits [B, V], lengths [B])`."""
  cfg = model.config
  b, s, _ = embeds.shape
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  lengths = mask.sum(-1).astype(jnp.int32)
  tables = model.rope_tables(positions)
  masks = model.masks(positions, positions, mask)
  caches = []
  h = embeds.astype(model.dtype)
  for layer in model.layers:
    cos, sin = tables[layer.layer_type]
    h, (k, v) = layer(h, cos, sin, masks[layer.layer_type])
    size = _cache_len(model, layer.layer_type, total)
    empty = {"k": jnp.zeros((b, cfg.num_kv_heads, size, cfg.head_dim), model.dtype),
             "v": jnp.zeros((b, cfg.num_kv_heads, size, cfg.head_dim), model.dtype),
             "pos": jnp.full((b, size), -1, jnp.int32)}
    # Only the last `size` real tokens fit a ring buffer; padding never enters.
    ok = mask.astype(bool) & (positions >= lengths[:, None] - size)
    caches.append(_write(empty, k, v, positions, ok))
  last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)
  return caches, model.logits(last)[:, 0], lengths


def decode_step(model, caches, tokens, pos):
  """Feeds `tokens` `[B]` at positions `pos` `[B]`, each row over its own caches;
  returns `(caches, next-token logits [B, V])`."""
  cfg = model.config
  b = tokens.shape[0]
  bidx = jnp.arange(b)[:, None]
  pos = pos[:, None]
  x = model.embed(tokens[:, None])
  tables = model.rope_tables(pos)
  new_caches = []
  for layer, cache in zip(model.layers, caches):
    cos, sin = tables[layer.layer_type]
    window = cfg.sliding_window if layer.layer_type == SLIDING else None
    slot = pos % cache["pos"].shape[1]
    new_pos = cache["pos"].at[bidx, slot].set(pos)

    def update(k, v, cache=cache, slot=slot):
      # One new position per row: a dynamic slice update along the slot axis.
      put = lambda cc, xx: jax.vmap(lambda ci, xi, si: jax.lax.dynamic_update_slice_in_dim(
          ci, xi.astype(ci.dtype), si, axis=1))(cc, xx, slot[:, 0])
      return put(cache["k"], k), put(cache["v"], v)

    x, (k_all, v_all) = layer(x, cos, sin, _cache_mask(new_pos, pos, window), update)
    new_caches.append({"k": k_all, "v": v_all, "pos": new_pos})
  return new_caches, model.logits(x)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "sgraphdef", "beta"))
def _prefill(graphdef, state, embeds, mask, rng, streams=None, *, max_new, sgraphdef=None, beta=1.0):
  """Prefills `embeds` `[B, S, d]` into caches for S + `max_new` positions (and the
  logit streams' prompts into theirs); returns the decode carry (see `_decode`)."""
  model = nnx.merge(graphdef, state)
  b, s, _ = embeds.shape
  caches, logits, lengths = prefill_caches(model, embeds, mask, s + max_new)
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

  def body(c):
    rng, sub = jax.random.split(c["rng"])
    nxt = _sample(c["logits"], sub, temperature, top_k, top_p)
    nxt = jnp.where(c["done"], 0, nxt)
    i = c["i"]
    caches, logits = decode_step(model, c["caches"], nxt, lengths + i)
    out = {"i": i + 1, "done": c["done"] | jnp.isin(nxt, eos_ids), "out": c["out"].at[:, i].set(nxt),
           "caches": caches, "logits": logits, "rng": rng, "lengths": lengths}
    if "streams" in c:
      st = c["streams"]
      small = nnx.merge(sgraphdef, sstate)
      per_row = st["lengths"].shape[0] // b
      s_caches, s_logits = decode_step(small, st["caches"], jnp.repeat(nxt, per_row), st["lengths"] + i)
      out["logits"] = combine_logits(logits, s_logits.reshape(b, per_row, -1), st["weights"], beta)
      out["streams"] = dict(st, caches=s_caches)
    return out

  def cond(c):
    return (c["i"] < limit) & ~jnp.all(c["done"])

  return jax.lax.while_loop(cond, body, carry)


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
    s_b = bucket(embeds.shape[1])
    embeds = jnp.pad(embeds, ((0, 0), (0, s_b - embeds.shape[1]), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, s_b - mask.shape[1])))
  graphdef, state = nnx.split(model)
  stream_kw, streams, sstate = {}, None, None
  if logit_streams is not None:
    sgraphdef, sstate = nnx.split(logit_streams.model)
    s_embeds, s_mask, weights = _streams_input(logit_streams, b)
    streams = {"state": sstate, "embeds": s_embeds, "mask": s_mask, "weights": weights}
    stream_kw = {"sgraphdef": sgraphdef, "beta": float(logit_streams.beta)}
  carry = _prefill(graphdef, state, embeds, mask, jax.random.key(seed), streams, max_new=bucket(max_new_tokens),
                   **stream_kw)
  eos = jnp.asarray(np.array(list(eos_ids) or [-1], np.int32))
  decode = functools.partial(_decode, graphdef, state, eos_ids=eos, sstate=sstate, temperature=float(temperature),
                             top_k=top_k, top_p=top_p, **stream_kw)
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
