"""Continuous batching: many personas share every decode step of one trunk.

The engine owns `slots` rows of KV cache, each `max_context` positions long
(sliding-window layers keep a ring of the window). A background thread loops:

1. **Admit.** While a slot is free and a request waits, the request's prompt
   (its persona's soft tokens spliced in) is prefilled into that slot alone,
   and its first token sampled. A new request thus joins at the next step
   boundary, whatever the others are doing.
2. **Step.** One jitted decode step advances every busy slot by one token,
   each with its own position, persona, temperature, top-p and seed.
3. **Emit.** Each new token goes to its request's callback as text. A row
   that hits EOS, a stop string, its `max_tokens` or the context end, or
   whose client went away, frees its slot at once.

Sampling is reproducible per request: row r's token at position p is drawn
with `fold_in(key(seed_r), p)`, whatever else shares the batch. Temperature 0
is greedy, so a reply equals `persomux.generate`'s greedy output.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import time
import uuid
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persomux import prompts as prompts_lib
from persomux import sampling


class QueueFull(Exception):
  """The engine's waiting queue is full."""


class PromptTooLong(ValueError):
  """A prompt (with its soft tokens) leaves no room to generate within the context."""


@dataclasses.dataclass
class Request:
  """One generation. `emit(text_delta, finish_reason)` is called from the engine
  thread: with `finish_reason=None` for each new piece of text, then once with
  "stop" or "length" (and the last piece, possibly empty)."""
  prompt_ids: Sequence[int]
  soft_index: int
  emit: Callable[[str, str | None], None]
  prompt_module: Any = None  # e.g. `PersonaBank.module`; None: no soft tokens
  stream_ids: Sequence[Sequence[int]] | None = None  # Drift: the small LM's S stream prompts (base first)
  stream_weights: Sequence[float] | None = None  # Drift: [S - 1] weights of the attribute streams
  class_id: int = 0  # the request's row of `prompt_module`
  bias_scale: float = 1.0
  max_tokens: int = 256
  temperature: float = 1.0
  top_p: float = 1.0
  seed: int = 0
  stop: Sequence[str] = ()
  id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:24])
  # Filled by the engine.
  tokens: list = dataclasses.field(default_factory=list)
  text: str = ""
  finish_reason: str | None = None
  prompt_tokens: int = 0
  cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

  def cancel(self) -> None:
    """Frees the request's slot at the next step boundary (e.g. its client disconnected)."""
    self.cancelled.set()


def sample_rows(logits, keys, temperature, top_p):
  """Next tokens `[B]` from logits `[B, V]`, each row with its own PRNG key,
  temperature (0: greedy) and top-p (1: no truncation)."""
  greedy = sampling.argmax(logits)  # jnp.argmax, in plain reductions (faster on CPU)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]

  def truncate(x):
    order = jnp.argsort(-x, axis=-1)
    sorted_x = jnp.take_along_axis(x, order, axis=-1)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]  # the best token always stays
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, x, -jnp.inf)

  scaled = jax.lax.cond(jnp.any((top_p < 1.0) & (temperature > 0)), truncate, lambda x: x, scaled)
  drawn = jax.vmap(lambda k, x: jax.random.categorical(k, x))(keys, scaled).astype(jnp.int32)
  return jnp.where(temperature > 0, drawn, greedy)


def _row_keys(seeds, positions):
  return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, positions)


@functools.partial(jax.jit, static_argnames=("graphdef", "total"), donate_argnames=("caches",))
def _prefill_slot(graphdef, state, caches, slot, ids, length, soft, soft_len, soft_index, seed, temperature, top_p,
                  steer, *, total):
  """Prefills one prompt `ids` `[1, T]` (real `length`) with its soft tokens into
  row `slot` of `caches`; the first token is sampled from its logits + `steer`
  `[V]` (Drift's pull, or 0). Returns `(caches, first token, prompt length)`."""
  model = nnx.merge(graphdef, state)
  t = ids.shape[1]
  embeds = model.embed(ids)
  mask = (jnp.arange(t)[None, :] < length).astype(jnp.int32)
  embeds, mask, _, _ = prompts_lib.splice(embeds, mask, soft, soft_len[None], soft_index[None])
  row, logits, lengths = sampling.prefill_caches(model, embeds, mask, total)
  caches = sampling.insert_rows(caches, row, slot)
  first = sample_rows(logits + steer[None], _row_keys(seed[None], lengths), temperature[None], top_p[None])
  return caches, first[0], lengths[0]


def _pull(stream_logits, weights, beta):
  """Drift's (1/β) Σ_s w_s (h_s − h_0) `[B, V]` from `[B, S, V]` logits; 0 where a weight is 0."""
  diff = stream_logits[:, 1:] - stream_logits[:, :1]
  return jnp.sum(jnp.where(weights[..., None] != 0, weights[..., None] * diff, 0.0), axis=1) / beta


@functools.partial(jax.jit, static_argnames=("graphdef", "total"), donate_argnames=("caches",))
def _prefill_streams(graphdef, state, caches, row, ids, lengths, weights, beta, *, total):
  """Prefills a slot's S Drift stream prompts `ids` `[S, T]` into rows `row..row+S`
  of the stream caches; returns `(caches, the pull on the first token [V])`."""
  model = nnx.merge(graphdef, state)
  mask = (jnp.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(jnp.int32)
  rows, logits, _ = sampling.prefill_caches(model, model.embed(ids), mask, total)
  caches = sampling.insert_rows(caches, rows, row)
  return caches, _pull(logits[None], weights[None], beta)[0]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _unstack_layers(graphdef, state):
  """`sampling.unstack_layers` of the model, jitted: sliced once, when an engine starts."""
  return sampling.unstack_layers(nnx.merge(graphdef, state))


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("caches",))
def _step(graphdef, state, layers, caches, tokens, pos, seeds, temperature, top_p):
  """One decode step of every slot: feeds `tokens` at `pos`; returns `(caches, next tokens)`.
  `layers`: `_unstack_layers`' weights, with `caches` in `sampling.unstack_caches`' layout, or None."""
  model = nnx.merge(graphdef, state)
  caches, logits = sampling.decode_step(model, caches, tokens, pos, layers)
  return caches, sample_rows(logits, _row_keys(seeds, pos + 1), temperature, top_p)


@functools.partial(jax.jit, static_argnames=("graphdef", "sgraphdef"), donate_argnames=("caches", "scaches"))
def _step_streams(graphdef, state, layers, caches, tokens, pos, seeds, temperature, top_p, sgraphdef, sstate,
                  slayers, scaches, spos, weights, beta):
  """`_step` with Drift: every slot's S streams (`scaches` rows, at `spos`; `slayers` as
  `layers`, for the small LM) are fed the slot's token too, and each slot samples from its
  logits + its pull."""
  model, small = nnx.merge(graphdef, state), nnx.merge(sgraphdef, sstate)
  caches, logits = sampling.decode_step(model, caches, tokens, pos, layers)
  per = spos.shape[0] // tokens.shape[0]
  scaches, slogits = sampling.decode_step(small, scaches, jnp.repeat(tokens, per), spos, slayers)
  steered = logits + _pull(slogits.reshape(tokens.shape[0], per, -1), weights, beta)
  return caches, scaches, sample_rows(steered, _row_keys(seeds, pos + 1), temperature, top_p)


def _stop_overlap(text: str, stops: Sequence[str]) -> int:
  """The longest end of `text` that is a proper beginning of a stop string."""
  best = 0
  for s in stops:
    for k in range(min(len(s) - 1, len(text)), best, -1):
      if text.endswith(s[:k]):
        best = k
        break
  return best


class Engine:
  """Serves `Request`s on `trunk` with `slots` rows of continuous batching.

  Each request brings its own prompt module and row (`PersonaBank.module`,
  `class_id`), so personas added while serving never shift a running one.
  """

  def __init__(self, trunk, tokenizer, *, slots: int = 8, max_context: int = 1024, queue_size: int = 64,
               drift_model=None, drift_streams: int = 0, drift_beta: float = 0.5):
    if slots < 1 or max_context < 8 or queue_size < 1:
      raise ValueError(f"slots={slots}, max_context={max_context}, queue_size={queue_size}: expected slots >= 1, "
                       "max_context >= 8 and queue_size >= 1")
    self.trunk, self.tokenizer = trunk, tokenizer
    self.slots, self.max_context, self.queue_size = slots, max_context, queue_size
    self._graphdef, self._state = nnx.split(trunk)
    self._eos = set(sampling._eos_ids(trunk, tokenizer).tolist())
    self._queue: collections.deque[Request] = collections.deque()
    self._cond = threading.Condition()
    self._rows: list[Request | None] = [None] * slots
    self._stopping = False
    self._thread: threading.Thread | None = None
    self._caches = self._empty_caches(self.trunk, slots)
    # Where decode runs unrolled (`sampling.decode_unrolled`: on CPU), each step reads the layers'
    # weights sliced out once here and caches kept per layer: XLA:CPU copies every slice of a
    # stacked array before its product, so a scanned step copied every layer weight it read.
    # Costs a second copy of the layer weights for the engine's life.
    self._layers = None
    if sampling.decode_unrolled():
      self._layers = _unstack_layers(self._graphdef, self._state)
      self._caches = sampling.unstack_caches(self._caches)
    # Drift: `drift_streams` rows of the small LM's cache per slot (base + attributes).
    self.drift_streams, self.drift_beta = drift_streams, float(drift_beta)
    if drift_streams:
      if drift_streams < 2:
        raise ValueError(f"drift_streams={drift_streams}: expected 0 (no Drift) or at least 2 (base + 1 attribute)")
      self._small = drift_model if drift_model is not None else trunk
      if self._small.config.vocab_size != trunk.config.vocab_size:
        raise ValueError("the Drift model's vocabulary differs from the trunk's; Drift needs a shared tokenizer")
      self._sgraphdef, self._sstate = nnx.split(self._small)
      self._scaches = self._empty_caches(self._small, slots * drift_streams)
      self._slayers = None
      if self._layers is not None:
        self._slayers = self._layers if self._small is trunk else _unstack_layers(self._sgraphdef, self._sstate)
        self._scaches = sampling.unstack_caches(self._scaches)
      self._spos = np.zeros((slots * drift_streams,), np.int32)
      self._sweights = np.zeros((slots, drift_streams - 1), np.float32)
    self.stats = {"requests": 0, "completed": 0, "steps": 0, "max_active": 0, "generated_tokens": 0}
    self.error: BaseException | None = None

  # --- public API -----------------------------------------------------------------------

  def start(self) -> "Engine":
    self._thread = threading.Thread(target=self._loop, name="persomux-engine", daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    with self._cond:
      self._stopping = True
      self._cond.notify_all()
    if self._thread is not None:
      self._thread.join(timeout=60)

  @staticmethod
  def soft_len(request: Request) -> int:
    """How many soft tokens `request` gets."""
    m = request.prompt_module
    if m is None:
      return 0
    return int(m.num_tokens - (getattr(m, "bias_tokens", 0) if request.bias_scale == 0 else 0))

  def submit(self, request: Request) -> None:
    """Queues `request`; raises `PromptTooLong` or `QueueFull` (nothing is queued then)."""
    if request.stream_ids is not None:
      if not self.drift_streams:
        raise ValueError("this server runs without Drift (start it with --drift_streams)")
      if len(request.stream_ids) != self.drift_streams or len(request.stream_weights) != self.drift_streams - 1:
        raise ValueError(f"Drift needs {self.drift_streams} streams and {self.drift_streams - 1} weights")
      longest = max(len(x) for x in request.stream_ids)
      if longest >= self.max_context:
        raise PromptTooLong(f"a Drift stream prompt is {longest} tokens; the context holds {self.max_context}")
    total = len(request.prompt_ids) + self.soft_len(request)
    if total >= self.max_context:
      raise PromptTooLong(f"the prompt is {total} tokens (soft tokens included); the context holds "
                          f"{self.max_context}, and at least one must remain to generate")
    with self._cond:
      if len(self._queue) >= self.queue_size:
        raise QueueFull(f"{len(self._queue)} requests are waiting (--queue_size={self.queue_size})")
      request.prompt_tokens = total
      self._queue.append(request)
      self.stats["requests"] += 1
      self._cond.notify_all()

  def status(self) -> dict:
    with self._cond:
      active = sum(r is not None for r in self._rows)
      return {"slots": self.slots, "active": active, "queued": len(self._queue),
              "max_context": self.max_context, **self.stats,
              "error": None if self.error is None else repr(self.error)}

  # --- the loop -------------------------------------------------------------------------

  def _empty_caches(self, model, rows: int):
    return sampling.init_caches(model, rows, self.max_context)

  def _loop(self):
    try:
      self._pos = np.zeros((self.slots,), np.int32)  # position of each slot's last token
      self._last = np.zeros((self.slots,), np.int32)  # each slot's last token (fed next)
      while True:
        with self._cond:
          while not self._stopping and not self._queue and all(r is None for r in self._rows):
            self._cond.wait()
          if self._stopping:
            break
        self._free_cancelled()
        self._admit()
        if any(r is not None for r in self._rows):
          self._advance()
    except BaseException as e:  # noqa: BLE001 (reported on every request, and in status)
      self.error = e
      with self._cond:
        for i, r in enumerate(self._rows):
          if r is not None:
            self._rows[i] = None
            r.finish_reason = "error"
            r.emit("", "error")
        while self._queue:
          r = self._queue.popleft()
          r.finish_reason = "error"
          r.emit("", "error")
      raise

  def _free_cancelled(self):
    for i, r in enumerate(self._rows):
      if r is not None and r.cancelled.is_set():
        self._rows[i] = None

  def _admit(self):
    while True:
      with self._cond:
        free = [i for i, r in enumerate(self._rows) if r is None]
        if not free or not self._queue:
          return
        req = self._queue.popleft()
      if req.cancelled.is_set():
        continue
      self._prefill(free[0], req)

  def _prefill(self, slot: int, req: Request):
    ids = np.asarray(req.prompt_ids, np.int32)
    t = sampling.bucket(len(ids))
    padded = np.zeros((1, t), np.int32)
    padded[0, :len(ids)] = ids
    d = self.trunk.config.d_model
    if req.prompt_module is not None:
      soft, soft_len = req.prompt_module(jnp.asarray([req.class_id], jnp.int32), jnp.asarray([req.bias_scale], jnp.float32))
      soft_len = soft_len[0]
    else:
      soft, soft_len = jnp.zeros((1, 1, d), jnp.float32), jnp.int32(0)
    steer = jnp.zeros((self.trunk.config.vocab_size,), jnp.float32)
    if self.drift_streams:
      self._sweights[slot] = 0.0
    if req.stream_ids is not None:
      s = self.drift_streams
      t_s = sampling.bucket(max(len(x) for x in req.stream_ids))
      sids = np.zeros((s, t_s), np.int32)
      for i, x in enumerate(req.stream_ids):
        sids[i, :len(x)] = x
      lens = np.array([len(x) for x in req.stream_ids], np.int32)
      weights = np.asarray(req.stream_weights, np.float32)
      self._scaches, steer = _prefill_streams(
          self._sgraphdef, self._sstate, self._scaches, jnp.int32(slot * s), jnp.asarray(sids), jnp.asarray(lens),
          jnp.asarray(weights), jnp.float32(self.drift_beta), total=self.max_context)
      self._spos[slot * s:(slot + 1) * s] = lens
      self._sweights[slot] = weights
    self._caches, first, length = _prefill_slot(
        self._graphdef, self._state, self._caches, jnp.int32(slot), jnp.asarray(padded), jnp.int32(len(ids)),
        soft, soft_len, jnp.int32(req.soft_index), jnp.uint32(req.seed % 2**32), jnp.float32(req.temperature),
        jnp.float32(req.top_p), steer, total=self.max_context)
    self._rows[slot] = req
    self._pos[slot] = int(length)  # the first generated token's position
    self._last[slot] = int(first)
    self.stats["max_active"] = max(self.stats["max_active"], sum(r is not None for r in self._rows))
    self._take(slot, int(first))

  def _advance(self):
    rows = self._rows
    active = np.array([r is not None for r in rows])
    seeds = np.array([(r.seed % 2**32) if r else 0 for r in rows], np.uint32)
    temps = np.array([r.temperature if r else 0.0 for r in rows], np.float32)
    top_p = np.array([r.top_p if r else 1.0 for r in rows], np.float32)
    steering = [r is not None and r.stream_ids is not None for r in rows]
    args = (jnp.asarray(self._last), jnp.asarray(self._pos), jnp.asarray(seeds), jnp.asarray(temps),
            jnp.asarray(top_p))
    if any(steering):
      weights = np.where(np.array(steering)[:, None], self._sweights, 0.0).astype(np.float32)
      self._caches, self._scaches, nxt = _step_streams(
          self._graphdef, self._state, self._layers, self._caches, *args, self._sgraphdef, self._sstate,
          self._slayers, self._scaches, jnp.asarray(self._spos), jnp.asarray(weights), jnp.float32(self.drift_beta))
      self._spos += 1
    else:
      self._caches, nxt = _step(self._graphdef, self._state, self._layers, self._caches, *args)
    nxt = np.asarray(nxt)
    self.stats["steps"] += 1
    for slot in np.flatnonzero(active):
      self._pos[slot] += 1
      self._last[slot] = nxt[slot]
      self._take(int(slot), int(nxt[slot]))

  def _take(self, slot: int, token: int):
    """Adds `token` to the request in `slot`, emits its text, and frees the slot when it is done."""
    req = self._rows[slot]
    if req.cancelled.is_set():
      self._rows[slot] = None
      return
    finish = None
    if token in self._eos:
      finish = "stop"
    else:
      req.tokens.append(token)
      self.stats["generated_tokens"] += 1
    if finish is None and (len(req.tokens) >= req.max_tokens or self._pos[slot] + 1 >= self.max_context):
      finish = "length"
    text = self.tokenizer.decode(req.tokens, skip_special_tokens=True)
    if finish is None and text.endswith("\ufffd"):
      text = req.text  # an incomplete character: wait for the rest of its bytes
    cut = min((i for i in (text.find(s, max(0, len(req.text) - len(s))) for s in req.stop if s) if i >= 0),
              default=-1)
    if cut >= 0:
      text, finish = text[:cut], "stop"
    # Hold back an ending that may begin a stop string, until the next tokens settle it.
    upto = len(text) if finish is not None else len(text) - _stop_overlap(text, req.stop)
    upto = max(upto, len(req.text))
    delta = text[len(req.text):upto]
    req.text = req.text + delta
    if finish is not None:
      req.finish_reason = finish
      self._rows[slot] = None
      self.stats["completed"] += 1
    if delta or finish is not None:
      req.emit(delta, finish)
