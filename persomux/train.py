"""Training stages: the loss, one jitted step, and resumable phased loops.

Stage 1 (codebook pretraining) is two phases: a warmup in which only the bias
tokens train (W and every m_i frozen, m_i = 0), then W, b and all m_i jointly.
Stage 2 (new classes) is one phase in which only the new classes' mixtures
train. A phase names what trains with a `PromptParam` subtype; frozen
parameters get no optimizer state and stay bitwise unchanged.

Batches are dicts of numpy arrays (see `persomux.data`): `input_ids`,
`attention_mask`, `loss_mask` `[batch, seq]`, `soft_index`, `class_ids`
`[batch]`, and optionally `targets` `[batch, m]`. `loss_mask[b, t] = 1` marks
token t as a target; it is predicted from the position just before it in the
spliced sequence. Logits are computed only there, a chunk of `loss_chunk`
tokens at a time, so the loss never holds `[batch, seq, vocab]` logits.

An update may run as several micro-batches (`BatchSource.micro_batches`):
their gradients of the summed loss add up, and the step divides by the
update's target tokens, so it equals the update of one big batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from persomux import data as data_lib
from persomux import prompts as prompts_lib
from persomux.checkpoint import Checkpointer, Part
from persomux.models import modeling


class TrainingDiverged(RuntimeError):
  """A non-finite loss or gradient; the last good checkpoint is left intact."""


class ConfigChanged(ValueError):
  """A resume whose config differs from the one the checkpoint was written with."""


class BatchSource(Protocol):
  """Deterministic batches: the same (epoch, index) always gives the same update.

  `micro_batches(epoch, index)` is the update's batch as the micro-batches
  that run one forward pass each (one dict for an update in a single pass).
  """

  def steps_per_epoch(self) -> int: ...

  def micro_batches(self, epoch: int, index: int) -> list[dict[str, np.ndarray]]: ...


# --- loss ------------------------------------------------------------------------

LOSS_CHUNK = 1024  # default `loss_chunk`: target tokens whose logits are computed at once


def _target_index(loss_mask: jax.Array) -> jax.Array:
  """`[batch, seq]`: each row's target positions (loss_mask > 0, position 0 excluded),
  in order, then zeros; for batches without a `targets` array (see `data.collate`)."""
  t = loss_mask.shape[1]
  carries = (loss_mask > 0) & (jnp.arange(t) > 0)[None, :]
  order = jnp.argsort(jnp.where(carries, 0, 1), axis=1, stable=True)
  return jnp.where(jnp.take_along_axis(carries, order, axis=1), order, 0).astype(jnp.int32)


def chunked_nll(trunk, h: jax.Array, ids: jax.Array, loss_chunk: int = LOSS_CHUNK) -> jax.Array:
  """`-log p(ids | h)` `[batch, m]` from hidden states `h` `[batch, m, d]` (before the final norm).

  Logits exist for about `loss_chunk` tokens at a time (`max(1, loss_chunk // batch)`
  per row), chunk after chunk. Under differentiation, with the final norm and head
  frozen (soft prompts, LoRA), each chunk's forward pass also takes each token's
  gradient with respect to its own hidden state (a token's loss depends on no other),
  and the backward pass only scales it: no logits are kept or recomputed. When the
  head trains too (the demo's base model), the backward pass recomputes a chunk's
  logits at a time (with one chunk, it keeps them).
  """
  b, m = h.shape[:2]
  per_row = max(1, min(m, loss_chunk // max(b, 1)))
  n = -(-m // per_row)
  if n * per_row > m:
    h = jnp.pad(h, ((0, 0), (0, n * per_row - m), (0, 0)))
    ids = jnp.pad(ids, ((0, 0), (0, n * per_row - m)))
  norm_def, norm_state = nnx.split(trunk.norm)
  return _head_nll(norm_def, trunk.config.final_softcap, per_row, (norm_state, trunk.head_weight()), h, ids)[:, :m]


def _chunk_nll(norm_def, softcap, params, hc, yc):
  norm_state, w = params
  logits = modeling.head_logits(nnx.merge(norm_def, norm_state), w, hc, softcap)
  return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, yc[..., None], axis=-1)[..., 0]


def _chunks(x, per_row: int):
  """`[b, n * per_row, ...] -> [n, b, per_row, ...]`: rows stay where the batch is sharded."""
  return x.reshape(x.shape[0], -1, per_row, *x.shape[2:]).swapaxes(0, 1)


def _unchunk(x):
  return x.swapaxes(0, 1).reshape(x.shape[1], -1, *x.shape[3:])


def _map_chunks(fn, per_row: int, *xs):
  """`fn` over the token chunks of `xs` (`[b, n * per_row, ...]` each), results unchunked."""
  if xs[0].shape[1] == per_row:
    return fn(*xs)
  return jax.tree.map(_unchunk, jax.lax.map(lambda c: fn(*c), tuple(_chunks(x, per_row) for x in xs)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _head_nll(norm_def, softcap, per_row, params, h, ids):
  """`chunked_nll`'s chunks; `params` = (final norm's state, head weight)."""
  return _map_chunks(functools.partial(_chunk_nll, norm_def, softcap, params), per_row, h, ids)


def _head_nll_fwd(norm_def, softcap, per_row, params, h, ids):
  values = jax.tree.map(lambda p: p.value, params)
  h, ids = h.value, ids.value
  nll = functools.partial(_chunk_nll, norm_def, softcap)
  if any(p.perturbed for p in jax.tree.leaves(params)):  # the head trains
    if h.shape[1] == per_row:
      out, vjp = jax.vjp(lambda p, x: nll(p, x, ids), values, h)
      return out, {"vjp": vjp}
    return _map_chunks(functools.partial(nll, values), per_row, h, ids), {"inputs": (values, h, ids)}

  def with_grad(hc, yc):  # each token's loss and its gradient with respect to its own hidden state
    out, vjp = jax.vjp(lambda x: nll(values, x, yc), hc)
    return out, vjp(jnp.ones_like(out))[0]

  out, dh = _map_chunks(with_grad, per_row, h, ids)
  return out, {"dh": dh}


def _head_nll_bwd(norm_def, softcap, per_row, res, g):
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    return None, None, None
  if "dh" in res:
    return None, (g[..., None] * res["dh"]).astype(res["dh"].dtype), None
  if "vjp" in res:
    return (*res["vjp"](g), None)
  values, h, ids = res["inputs"]
  nll = functools.partial(_chunk_nll, norm_def, softcap)

  def chunk(acc, c):  # recomputes one chunk's logits; the head's gradient adds up over chunks
    hc, yc, gc = c
    _, vjp = jax.vjp(lambda p, x: nll(p, x, yc), values, hc)
    dp, dx = vjp(gc)
    return jax.tree.map(jnp.add, acc, dp), dx

  dp, dx = jax.lax.scan(chunk, jax.tree.map(jnp.zeros_like, values),
                        (_chunks(h, per_row), _chunks(ids, per_row), _chunks(g, per_row)))
  return dp, _unchunk(dx), None


_head_nll.defvjp(_head_nll_fwd, _head_nll_bwd, symbolic_zeros=True)


def target_nll(trunk, prompt, batch: dict[str, jax.Array], bias_scale=1.0, loss_chunk: int = LOSS_CHUNK):
  """Negative log-likelihood of each target token, computed at target positions only.

  Returns `(nll [batch, m], weight [batch, m])` over the batch's `targets`
  (token positions, see `data.collate`; derived from `loss_mask` when the batch
  has none, with m = seq), where `weight` is the loss mask there (0 on
  padding; token 0 never counts). With `prompt=None` the trunk runs without
  soft tokens. No `[batch, seq, vocab]` array is formed (`chunked_nll`).
  """
  ids = batch["input_ids"]
  embeds = trunk.embed(ids)
  if prompt is None:
    h = trunk.hidden_states(embeds, batch["attention_mask"])
    token_index = None
  else:
    soft, soft_len = prompt(batch["class_ids"], bias_scale)
    embeds, mask, positions, token_index = prompts_lib.splice(
        embeds, batch["attention_mask"], soft, soft_len, batch["soft_index"])
    h = trunk.hidden_states(embeds, mask, positions)
  targets = batch["targets"] if "targets" in batch else _target_index(batch["loss_mask"])
  weight = jnp.take_along_axis(batch["loss_mask"].astype(jnp.float32), targets, axis=1) * (targets > 0)
  # The hidden state just before each target (in the spliced sequence) predicts it.
  pos = targets if token_index is None else jnp.take_along_axis(token_index, targets, axis=1)
  h = jnp.take_along_axis(h, jnp.maximum(pos - 1, 0)[..., None], axis=1)
  gold = jnp.take_along_axis(ids, targets, axis=1)
  return chunked_nll(trunk, h, gold, loss_chunk) * weight, weight


def loss_sums(trunk, prompt, batch, bias_scale=1.0, loss_chunk: int = LOSS_CHUNK):
  """`(nll summed over the batch's targets, target tokens)`."""
  nll, weight = target_nll(trunk, prompt, batch, bias_scale, loss_chunk)
  return nll.sum(), weight.sum()


def mean_loss(trunk, prompt, batch, bias_scale=1.0, loss_chunk: int = LOSS_CHUNK):
  s, n = loss_sums(trunk, prompt, batch, bias_scale, loss_chunk)
  return s / jnp.maximum(n, 1.0)


def _grads(trunk, prompt, wrt, batch, loss_chunk: int, mean: bool):
  """`(nll sum, target tokens, gradient)` of the mean (or summed) loss with respect to
  the `wrt` variables of the prompt, or of the trunk when `prompt` is None."""

  def f(owner):
    t, p = (owner, None) if prompt is None else (trunk, owner)
    s, n = loss_sums(t, p, batch, 1.0, loss_chunk)
    return (s / jnp.maximum(n, 1.0) if mean else s), (s, n)

  (_, (s, n)), grads = nnx.value_and_grad(f, argnums=nnx.DiffState(0, wrt), has_aux=True)(
      trunk if prompt is None else prompt)
  return s, n, grads


@nnx.jit(static_argnames="loss_chunk", graph_updates=False)
def train_step(trunk, prompt, opt, batch, loss_chunk: int = LOSS_CHUNK):
  """One optimizer step on the parameters `opt` was built for, from one batch; returns (loss, grad norm).

  With `prompt=None` the trunk's own variables that `opt` selects train (LoRA adapters, or every
  weight for the demo's base model)."""
  s, n, grads = _grads(trunk, prompt, opt.wrt, batch, loss_chunk, mean=True)
  opt.update(trunk if prompt is None else prompt, grads)
  return s / jnp.maximum(n, 1.0), optax.tree.norm(grads)


def adapter_step(trunk, opt, batch, loss_chunk: int = LOSS_CHUNK):
  """One optimizer step on the trunk's variables `opt` was built for (LoRA adapters), no soft prompt."""
  return train_step(trunk, None, opt, batch, loss_chunk=loss_chunk)


@nnx.jit(static_argnames="loss_chunk", donate_argnames="acc", graph_updates=False)
def accumulate_step(trunk, prompt, opt, batch, acc, loss_chunk: int = LOSS_CHUNK):
  """Adds one micro-batch's `(nll sum, target tokens, gradient of the nll sum)` to `acc`."""
  s, n, grads = _grads(trunk, prompt, opt.wrt, batch, loss_chunk, mean=False)
  return jax.tree.map(jnp.add, acc, {"nll": s, "tokens": n, "grads": grads})


@nnx.jit(graph_updates=False)
def apply_step(owner, opt, acc):
  """The optimizer step of an accumulated update: the gradient of the mean over all of its
  target tokens (not a mean of micro-batch means); returns (loss, grad norm)."""
  n = jnp.maximum(acc["tokens"], 1.0)
  grads = jax.tree.map(lambda g: g / n, acc["grads"])
  opt.update(owner, grads)
  return acc["nll"] / n, optax.tree.norm(grads)


def empty_accumulator(owner, wrt) -> dict:
  """Zeros shaped and placed like what `accumulate_step` adds up for `owner`'s `wrt` variables."""
  zeros = lambda x: jnp.zeros_like(x, device=x.sharding)
  return {"nll": jnp.zeros((), jnp.float32, device=_replicated_like(owner)),
          "tokens": jnp.zeros((), jnp.float32, device=_replicated_like(owner)),
          "grads": jax.tree.map(zeros, nnx.state(owner, wrt))}


def _replicated_like(module):
  """A sharding that replicates over the devices `module`'s first array lives on."""
  x = jax.tree.leaves(nnx.state(module))[0]
  if isinstance(x.sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec())
  return x.sharding


@nnx.jit(static_argnames="loss_chunk", graph_updates=False)
def row_losses(trunk, prompt, batch, bias_scale, loss_chunk: int = LOSS_CHUNK):
  """Per-row `(nll sum, target tokens)` `[batch]`."""
  nll, weight = target_nll(trunk, prompt, batch, bias_scale, loss_chunk)
  return nll.sum(-1), weight.sum(-1)


def score_examples(model, examples: Sequence, *, batch_size: int, max_len: int, pad_id: int = 0,
                   prompt=None, loss_chunk: int = LOSS_CHUNK, progress: str = "") -> tuple[np.ndarray, np.ndarray]:
  """Per-example `(nll sum [N], target tokens [N])` of `data.Example`s under `model`
  (and `prompt`, if given), batched by similar length (sorted, padded to the finer buckets: a
  forward pass compiles quickly and padding is most of a scoring pass's waste); `progress` names a
  progress bar."""
  sums, counts = np.zeros(len(examples)), np.zeros(len(examples))
  buckets = data_lib.default_buckets(max_len, fine=True)
  order = np.argsort([len(e) for e in examples], kind="stable")  # similar lengths share a batch
  starts = range(0, len(order), batch_size)
  for start in tqdm(starts, desc=progress, disable=not (progress and _host0()), dynamic_ncols=True):
    idx = order[start:start + batch_size]
    batch = data_lib.collate([examples[i] for i in idx], batch_size, buckets, pad_id)
    s, c = row_losses(model, prompt, batch, np.float32(1.0), loss_chunk=loss_chunk)
    sums[idx], counts[idx] = np.asarray(s)[:len(idx)], np.asarray(c)[:len(idx)]
  return sums, counts


def evaluate(trunk, prompt, batches: Sequence[dict[str, np.ndarray]], bias_scale=1.0,
             num_classes: int | None = None, loss_chunk: int = LOSS_CHUNK) -> dict[str, Any]:
  """Token-mean test loss overall and per class id.

  Returns `{"loss": float, "per_class": {class_id: float}, "tokens": int}`.
  """
  sums: dict[int, float] = {}
  counts: dict[int, float] = {}
  for batch in batches:
    s, c = jax.device_get(row_losses(trunk, prompt, batch, jnp.float32(bias_scale), loss_chunk=loss_chunk))
    for cid, si, ci in zip(np.asarray(batch["class_ids"]), s, c):
      if ci > 0:
        sums[int(cid)] = sums.get(int(cid), 0.0) + float(si)
        counts[int(cid)] = counts.get(int(cid), 0.0) + float(ci)
  total = sum(counts.values())
  return {"loss": sum(sums.values()) / max(total, 1.0),
          "per_class": {c: sums[c] / counts[c] for c in sorted(sums)},
          "tokens": int(total)}


# --- optimizer ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Adam with clipping and a schedule; a config section gives one with `run_config.Pretrain.optim()`."""

  learning_rate: float = 1e-3
  schedule: str = "constant"  # constant | cosine | linear
  warmup_steps: int = 0
  clip_norm: float | None = 1.0
  adam_eps: float = 1e-4  # the paper's Adam epsilon
  b1: float = 0.9
  b2: float = 0.999
  # Multiplies the step of the per-class mixtures m (Persona-Mux, stage 1):
  # each m_i sees only its class's rows, so it gets few, noisy updates.
  mixture_lr_scale: float = 1.0


def make_tx(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  if cfg.schedule == "constant":
    lr = optax.constant_schedule(cfg.learning_rate)
  elif cfg.schedule == "cosine":
    lr = optax.cosine_decay_schedule(cfg.learning_rate, max(total_steps - cfg.warmup_steps, 1))
  elif cfg.schedule == "linear":
    lr = optax.linear_schedule(cfg.learning_rate, 0.0, max(total_steps - cfg.warmup_steps, 1))
  else:
    raise ValueError(f"optim.schedule is {cfg.schedule!r}; expected constant, cosine or linear")
  if cfg.warmup_steps:
    lr = optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps), lr],
                              [cfg.warmup_steps])
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
  parts.append(optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps))
  if cfg.mixture_lr_scale != 1.0:
    parts.append(_scale_where("mixtures", cfg.mixture_lr_scale))
  return optax.chain(*parts)


def _scale_where(name: str, factor: float) -> optax.GradientTransformation:
  """Multiplies the updates of the parameters whose path names `name`."""

  def update(updates, state, params=None):
    del params
    scale = lambda path, u: u * factor if any(name in str(k) for k in path) else u
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# --- phased, resumable loop --------------------------------------------------------


@dataclasses.dataclass
class Phase:
  """A stretch of training with one set of trainable parameters.

  `steps` counts optimizer steps; batch `i` of the phase is batch
  `i % steps_per_epoch` of epoch `i // steps_per_epoch` of `data`.
  """

  name: str
  wrt: type
  data: BatchSource
  steps: int
  optim: OptimConfig


class MetricsLog:
  """Appends one JSON object per line to `path`."""

  def __init__(self, path: str | None):
    self.path = path
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write(self, **record):
    if self.path and _host0():
      with open(self.path, "a") as f:
        f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")


def _host0() -> bool:
  return jax.process_index() == 0


def _commit(module, mesh) -> None:
  """Places `module`'s uncommitted arrays (fresh optimizer counters, modules
  built in this process) where the step's outputs will be. The first step's
  outputs are committed, so an uncommitted input would make the second step
  compile the train step again."""
  target = jax.devices()[0] if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = nnx.state(module)
  nnx.update(module, jax.tree.map(
      lambda x: jax.device_put(x, target) if isinstance(x, jax.Array) and not x.committed else x, state))


def run_phases(trunk, prompt, phases: Sequence[Phase], *, workdir: str | None = None,
               checkpoint_every: int = 100, eval_fn: Callable[[], dict] | None = None,
               eval_every: int = 0, stage: str = "train", on_step: Callable[[int], None] | None = None,
               on_micro_batch: Callable[[int, int], None] | None = None, progress: bool = True, mesh=None,
               loss_chunk: int = LOSS_CHUNK, config: dict | None = None,
               allow_config_change: bool = False) -> dict[str, Any]:
  """Runs `phases` in order, resuming from the latest checkpoint in `workdir`.

  Each update takes its batch from `phase.data.micro_batches`: one forward
  and backward pass per micro-batch, their gradients summed, then one
  optimizer step with the gradient of the mean loss over all of the update's
  target tokens (exactly what one pass over the whole batch would give).

  Checkpoints (orbax, atomic) go to `workdir/checkpoints/<stage>` every
  `checkpoint_every` updates and at the end of each phase, holding the prompt
  state, the optimizer state, the position `(phase, step)` and `config`. A
  resumed run replays the same batches and ends with the same parameters as
  an uninterrupted one (a run killed between micro-batches redoes that
  update). A non-finite loss or gradient raises `TrainingDiverged` before
  anything is saved. Metrics go to `workdir/metrics.jsonl`.

  `config` is a flat `{field: value}` of what the run's result depends on
  (`run_config.Run.flat`): a resume whose `config` differs from the
  checkpoint's raises `ConfigChanged` naming the changed fields, unless
  `allow_config_change`.

  With `prompt=None` the trunk's own variables selected by each phase's
  `wrt` train instead (the LoRA baseline: `wrt=LoRAParam`); only they are
  checkpointed.

  With a `mesh`, the prompt state is sharded by `sharding.prompt_spec` and
  every batch over the data axes (the trunk is sharded when it is loaded).

  `on_step(global_step)` runs after each update, `on_micro_batch(global_step,
  index)` after each micro-batch of an accumulated one (progress, tests).

  Returns `{"final_loss": float, "steps": int}`.
  """
  from persomux import run_config

  if mesh is not None:
    from persomux import sharding

    if prompt is None:  # new adapters start on one device: lay them out like the trunk
      sharding.shard_module(trunk, mesh, sharding.trunk_spec)
    else:
      sharding.shard_module(prompt, mesh)
  # What trains, and what a checkpoint holds of it.
  owner = trunk if prompt is None else prompt
  saved = (lambda ph: {"adapters": Part(trunk, ph.wrt)}) if prompt is None else (lambda ph: {"prompt": prompt})
  place = (lambda b: b) if mesh is None else (lambda b: sharding.shard_batch(b, mesh))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", stage)) if workdir else None
  log = MetricsLog(os.path.join(workdir, "metrics.jsonl") if workdir else None)
  offsets = np.cumsum([0] + [p.steps for p in phases])
  resume_phase, resume_step, resume_opt = 0, 0, None
  last_loss = float("nan")
  if ckpt is not None and ckpt.latest_step() is not None:
    meta = ckpt.read_meta()
    resume_phase, resume_step = int(meta["phase"]), int(meta["step"])
    if resume_phase >= len(phases) or meta.get("phase_name") != phases[resume_phase].name:
      raise ValueError(f"{ckpt.directory}: checkpoint is from phase {meta.get('phase_name')!r}, "
                       "which this run's phases do not match; use a fresh workdir")
    changed = run_config.changes(meta.get("config") or {}, config or {})
    if changed and not allow_config_change:
      raise ConfigChanged(
          f"{ckpt.directory}: this checkpoint was written with another config; changed: {'; '.join(changed)}. "
          "Resuming would mix two runs: use a new workdir, or pass --allow_config_change to resume with "
          "the new config")
    # The optimizer of the checkpointed phase restores with it, even if that
    # phase was complete: its state shape depends on what trained.
    resume_opt = nnx.Optimizer(owner, make_tx(phases[resume_phase].optim, phases[resume_phase].steps),
                               wrt=phases[resume_phase].wrt)
    ckpt.restore({**saved(phases[resume_phase]), "opt": resume_opt})
    last_loss = float(meta.get("loss", last_loss))
    if _host0():
      print(f"[{stage}] resumed from {ckpt.directory}: phase {phases[resume_phase].name!r} "
            f"step {resume_step}/{phases[resume_phase].steps}"
            + (f" (config changed: {'; '.join(changed)})" if changed else ""))
  where = ckpt.directory if ckpt else "(none)"
  for pi, phase in enumerate(phases):
    if pi < resume_phase:
      continue
    if pi == resume_phase and resume_opt is not None:
      opt, first = resume_opt, resume_step
    else:
      opt, first = nnx.Optimizer(owner, make_tx(phase.optim, phase.steps), wrt=phase.wrt), 0
    for module in (trunk, prompt, opt):
      if module is not None:
        _commit(module, mesh)
    if first >= phase.steps:
      continue
    spe = phase.data.steps_per_epoch()
    if spe <= 0:
      raise ValueError(f"phase {phase.name!r}: the data yields no batches")
    bar = tqdm(range(first, phase.steps), desc=f"{stage}/{phase.name}", initial=first, total=phase.steps,
               disable=not (progress and _host0()), dynamic_ncols=True)
    t0, tokens = time.perf_counter(), 0
    for step in bar:
      gstep = int(offsets[pi]) + step + 1
      micro = phase.data.micro_batches(step // spe, step % spe)
      tokens += sum(int(np.asarray(b["attention_mask"]).sum()) for b in micro)
      if len(micro) == 1:
        loss, gnorm = train_step(trunk, prompt, opt, place(micro[0]), loss_chunk=loss_chunk)
      else:
        acc = empty_accumulator(owner, phase.wrt)
        for j, b in enumerate(micro):
          acc = accumulate_step(trunk, prompt, opt, place(b), acc, loss_chunk=loss_chunk)
          if on_micro_batch is not None:
            on_micro_batch(gstep, j)
        loss, gnorm = apply_step(owner, opt, acc)
      loss, gnorm = float(loss), float(gnorm)
      if not (math.isfinite(loss) and math.isfinite(gnorm)):
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {gnorm} (loss {loss:.4f})"
        raise TrainingDiverged(
            f"[{stage}/{phase.name}] {what} at step {step}; stopped without saving. The last good checkpoint "
            f"in {where} is intact; lower the learning rate or check the data.")
      last_loss = loss
      rate = tokens / max(time.perf_counter() - t0, 1e-9)
      bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
      log.write(event="train", stage=stage, phase=phase.name, step=gstep, loss=loss, grad_norm=gnorm,
                tokens_per_s=rate)
      done = step + 1
      if eval_fn is not None and eval_every and (gstep % eval_every == 0 or done == phase.steps):
        ev = eval_fn()
        log.write(event="eval", stage=stage, phase=phase.name, step=gstep, **ev)
      if on_step is not None:
        on_step(gstep)
      if ckpt is not None and (done % checkpoint_every == 0 or done == phase.steps):
        ckpt.save(gstep, {**saved(phase), "opt": opt},
                  {"phase": pi, "step": done, "phase_name": phase.name, "global_step": gstep,
                   "loss": loss, "config": config or {}})
    bar.close()
  if ckpt is not None:
    ckpt.close()
  return {"final_loss": last_loss, "steps": int(offsets[-1])}


# --- base language model (the demo's trunk) -----------------------------------------


def train_language_model(model, data: BatchSource, steps: int, optim: OptimConfig,
                         progress: bool = True) -> list[float]:
  """Trains every weight of `model` on `data` (loss on `loss_mask` tokens).

  This is how the embedded demo makes its small base model; real trunks
  arrive pretrained and stay frozen. Returns the loss per step.
  """
  opt = nnx.Optimizer(model, make_tx(optim, steps), wrt=nnx.Param)
  spe = data.steps_per_epoch()
  losses = []
  bar = tqdm(range(steps), desc="base LM", disable=not (progress and _host0()), dynamic_ncols=True)
  for step in bar:
    loss, _ = train_step(model, None, opt, data.batch(step // spe, step % spe))
    loss = float(loss)
    if not math.isfinite(loss):
      raise TrainingDiverged(f"[base LM] loss is {loss} at step {step}; lower the learning rate")
    losses.append(loss)
    bar.set_postfix(loss=f"{loss:.4f}")
  return losses
