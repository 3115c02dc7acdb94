"""SASRec (self-attentive sequential recommendation) in Flax NNX, and spherical k-means.

The paper clusters Amazon Video Games users by SASRec embeddings: a causal
transformer over each user's item sequence is trained to predict the next
item, which shapes the item (game) embeddings; a user is the mean of their
games' unit embeddings; users are grouped by cosine (spherical) k-means.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
  num_items: int  # item ids are 1..num_items; 0 pads
  max_len: int = 50
  d_model: int = 64
  num_blocks: int = 2
  num_heads: int = 1
  steps: int = 300
  batch_size: int = 128
  learning_rate: float = 1e-3
  seed: int = 0


class SASRec(nnx.Module):
  """Item sequences `[batch, max_len]` (0 = padding, left-padded) -> hidden states `[batch, max_len, d]`."""

  def __init__(self, cfg: SASRecConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.items = nnx.Embed(cfg.num_items + 1, cfg.d_model, rngs=rngs)
    self.positions = nnx.Embed(cfg.max_len, cfg.d_model, rngs=rngs)
    self.attn = nnx.List([nnx.MultiHeadAttention(cfg.num_heads, cfg.d_model, decode=False, rngs=rngs)
                          for _ in range(cfg.num_blocks)])
    self.ffn_in = nnx.List([nnx.Linear(cfg.d_model, cfg.d_model, rngs=rngs) for _ in range(cfg.num_blocks)])
    self.ffn_out = nnx.List([nnx.Linear(cfg.d_model, cfg.d_model, rngs=rngs) for _ in range(cfg.num_blocks)])
    self.norm1 = nnx.List([nnx.LayerNorm(cfg.d_model, rngs=rngs) for _ in range(cfg.num_blocks)])
    self.norm2 = nnx.List([nnx.LayerNorm(cfg.d_model, rngs=rngs) for _ in range(cfg.num_blocks)])
    self.final = nnx.LayerNorm(cfg.d_model, rngs=rngs)

  def __call__(self, seqs: jax.Array) -> jax.Array:
    t = seqs.shape[1]
    valid = seqs > 0
    h = self.items(seqs) * jnp.sqrt(self.cfg.d_model) + self.positions(jnp.arange(t))[None]
    h = h * valid[..., None]
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None] & valid[:, None, None, :]
    for attn, fin, fout, n1, n2 in zip(self.attn, self.ffn_in, self.ffn_out, self.norm1, self.norm2):
      x = n1(h)
      h = h + attn(x, x, x, mask=mask)
      h = h + fout(jax.nn.relu(fin(n2(h))))
      h = h * valid[..., None]
    return self.final(h)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Scores of every item `[..., num_items + 1]` (tied item embeddings)."""
    return hidden @ self.items.embedding[...].T


def left_pad(seqs: list[list[int]], max_len: int) -> np.ndarray:
  out = np.zeros((len(seqs), max_len), np.int32)
  for r, s in enumerate(seqs):
    s = s[-max_len:]
    if s:
      out[r, -len(s):] = s
  return out


@nnx.jit
def _step(model, opt, inputs, targets):
  def loss_fn(m):
    logits = m.logits(m(inputs))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    w = (targets > 0).astype(jnp.float32)
    return (ce * w).sum() / jnp.maximum(w.sum(), 1.0)

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  opt.update(model, grads)
  return loss


def train_sasrec(sequences: list[list[int]], cfg: SASRecConfig, progress: bool = True) -> tuple[SASRec, list]:
  """Trains next-item prediction (full softmax) on item-id sequences; returns (model, losses)."""
  model = SASRec(cfg, nnx.Rngs(cfg.seed))
  opt = nnx.Optimizer(model, optax.adam(cfg.learning_rate), wrt=nnx.Param)
  rng = np.random.default_rng(cfg.seed)
  padded = left_pad([s for s in sequences], cfg.max_len + 1)
  inputs_all, targets_all = padded[:, :-1], padded[:, 1:]
  losses = []
  for _ in tqdm(range(cfg.steps), desc="SASRec", disable=not progress):
    idx = rng.integers(0, len(padded), size=cfg.batch_size)
    losses.append(float(_step(model, opt, jnp.asarray(inputs_all[idx]), jnp.asarray(targets_all[idx]))))
  return model, losses


def user_embeddings(model: SASRec, sequences: list[list[int]]) -> np.ndarray:
  """A user's embedding: the mean of the unit-normalized SASRec embeddings of
  the games in their history, `[users, d]` (the model embeds the games; users
  with similar purchases land close in cosine)."""
  emb = np.asarray(model.items.embedding[...], np.float64)
  emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
  out = np.zeros((len(sequences), emb.shape[1]), np.float64)
  for r, seq in enumerate(sequences):
    if seq:
      out[r] = emb[np.asarray(seq)].mean(0)
  return out


def spherical_kmeans(x: np.ndarray, k: int, *, iters: int = 50, seed: int = 0) -> np.ndarray:
  """Cosine k-means: assignments `[n]` in 0..k-1 (k is capped at n).

  Points and centroids live on the unit sphere; initialization is k-means++
  on cosine distance. Empty clusters are re-seeded with the farthest point.
  """
  x = np.asarray(x, np.float64)
  x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  n = len(x)
  k = min(k, n)
  rng = np.random.default_rng(seed)
  centers = [x[rng.integers(n)]]
  for _ in range(1, k):
    d = 1.0 - np.max(x @ np.stack(centers).T, axis=1)
    p = np.clip(d, 0, None)
    centers.append(x[rng.choice(n, p=p / p.sum())] if p.sum() > 0 else x[rng.integers(n)])
  c = np.stack(centers)
  assign = np.zeros(n, np.int64)
  for _ in range(iters):
    sim = x @ c.T
    new = sim.argmax(1)
    for j in range(k):
      members = x[new == j]
      if len(members) == 0:
        far = int(np.argmin(sim.max(1)))
        new[far] = j
        members = x[far:far + 1]
      m = members.sum(0)
      c[j] = m / max(np.linalg.norm(m), 1e-12)
    if np.array_equal(new, assign):
      break
    assign = new
  return assign
