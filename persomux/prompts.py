"""Prompt parameterizations: soft-token embeddings per row from class ids.

Every parameterization maps `class_ids` `[batch]` and a bias scale (a scalar
or `[batch]`) to `(soft, soft_len)`: `soft` `[batch, num_tokens, d_model]`
holds each row's soft tokens left-aligned and `soft_len` `[batch]` says how
many of them the row uses. Rows may be different classes and use different
bias scales in one batch.

- `PersonaMux`: s_i = (bias_scale * b) ⊕ (Σ_j m_ij W_j), with b `[l, d]`,
  W `[n, k, d]` and m `[classes, n]`. A bias scale of exactly 0 removes the
  bias tokens entirely (the row uses k tokens), as in the paper.
- `SoftPrompt`: an independent k-token prompt per class (baseline).
- `RandomCodebook`: PersonaMux with W fixed at random (ablation); its
  codebook is a `FrozenCodebook` variable, which no optimizer ever selects.

Trainable parameters are float32 and typed by role (`Codebook`, `Bias`,
`Mixtures`, `ClassPrompts`, all subclasses of `PromptParam`), so a training
stage says what trains with one filter, e.g. `nnx.Optimizer(p, tx, wrt=Bias)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class PromptParam(nnx.Param):
  """A trainable soft-prompt parameter (the trunk's weights are plain nnx.Param)."""


class Codebook(PromptParam):
  """Shared codebook W `[n, k, d]`."""


class Bias(PromptParam):
  """Bias tokens b `[l, d]`."""


class Mixtures(PromptParam):
  """Per-class mixture weights m `[classes, n]`."""


class ClassPrompts(PromptParam):
  """Independent per-class soft prompts `[classes, k, d]` (SoftPrompt baseline)."""


class FrozenCodebook(nnx.Variable):
  """A codebook that never trains (RandomCodebook ablation)."""


def _scale_per_row(bias_scale, batch: int) -> jax.Array:
  return jnp.broadcast_to(jnp.asarray(bias_scale, jnp.float32), (batch,))


class PersonaMux(nnx.Module):
  """Codebook soft prompts: `l + k` tokens per row (`k` when the bias scale is 0)."""

  def __init__(self, num_classes: int, d_model: int, *, num_codes: int = 64, code_tokens: int = 8,
               bias_tokens: int = 12, init_std: float = 0.02, rngs: nnx.Rngs,
               codebook_type: type[nnx.Variable] = Codebook):
    self.num_codes, self.code_tokens, self.bias_tokens = num_codes, code_tokens, bias_tokens
    self.codebook = codebook_type(
        init_std * jax.random.normal(rngs.params(), (num_codes, code_tokens, d_model), jnp.float32))
    self.bias = Bias(init_std * jax.random.normal(rngs.params(), (bias_tokens, d_model), jnp.float32))
    # Zero mixtures: the paper's warmup starts from m_i = 0.
    self.mixtures = Mixtures(jnp.zeros((num_classes, num_codes), jnp.float32))

  @property
  def num_tokens(self) -> int:
    return self.bias_tokens + self.code_tokens

  def persona_tokens(self, class_ids: jax.Array) -> jax.Array:
    """Σ_j m_ij W_j for each row: `[batch, k, d]`."""
    m = jnp.take(self.mixtures[...], class_ids, axis=0)
    return jnp.einsum("bn,nkd->bkd", m, self.codebook[...])

  def __call__(self, class_ids: jax.Array, bias_scale=1.0) -> tuple[jax.Array, jax.Array]:
    b = class_ids.shape[0]
    scale = _scale_per_row(bias_scale, b)
    persona = self.persona_tokens(class_ids)
    bias = self.bias[...][None] * scale[:, None, None]
    with_bias = jnp.concatenate([bias, persona], axis=1)
    pad = jnp.zeros((b, self.bias_tokens) + persona.shape[2:], persona.dtype)
    without_bias = jnp.concatenate([persona, pad], axis=1)
    removed = scale == 0.0
    soft = jnp.where(removed[:, None, None], without_bias, with_bias)
    soft_len = jnp.where(removed, self.code_tokens, self.num_tokens).astype(jnp.int32)
    return soft, soft_len


class RandomCodebook(PersonaMux):
  """PersonaMux whose codebook is fixed at random: only mixtures (and bias) train."""

  def __init__(self, num_classes: int, d_model: int, **kw):
    super().__init__(num_classes, d_model, codebook_type=FrozenCodebook, **kw)


class SoftPrompt(nnx.Module):
  """An independent `num_tokens`-token soft prompt per class (paper: 8)."""

  def __init__(self, num_classes: int, d_model: int, *, num_tokens: int = 8, init_std: float = 0.02,
               rngs: nnx.Rngs):
    self.prompts = ClassPrompts(
        init_std * jax.random.normal(rngs.params(), (num_classes, num_tokens, d_model), jnp.float32))

  @property
  def num_tokens(self) -> int:
    return self.prompts.shape[1]

  def __call__(self, class_ids: jax.Array, bias_scale=1.0) -> tuple[jax.Array, jax.Array]:
    del bias_scale  # no bias tokens
    soft = jnp.take(self.prompts[...], class_ids, axis=0)
    return soft, jnp.full(class_ids.shape, self.num_tokens, jnp.int32)


def splice(token_embeds: jax.Array, attention_mask: jax.Array, soft: jax.Array, soft_len: jax.Array,
           soft_index: jax.Array):
  """Inserts each row's soft tokens before position `soft_index` of its tokens.

  Args:
    token_embeds: `[batch, seq, d]` embedded tokens.
    attention_mask: `[batch, seq]`, 1 on real tokens.
    soft: `[batch, P, d]` soft tokens, left-aligned; row b uses `soft_len[b]`.
    soft_len: `[batch]` int.
    soft_index: `[batch]` int, where the soft tokens go.

  Returns:
    `(embeds [batch, seq + P, d], mask [batch, seq + P], positions [batch, seq + P],
    token_index [batch, seq])`, where `token_index[b, t]` is the spliced position
    of token t. Rows with fewer than P soft tokens end with masked padding.
    Positions count real tokens only, so padding never shifts rotary phases.
  """
  b, t, _ = token_embeds.shape
  p = soft.shape[1]
  j = jnp.arange(t + p)[None, :]
  s = soft_index[:, None]
  n = soft_len[:, None]
  in_soft = (j >= s) & (j < s + n)
  src = jnp.clip(jnp.where(j < s, j, j - n), 0, t - 1)
  tok_ok = (j < s) | ((j >= s + n) & (j - n < t))
  tok = jnp.take_along_axis(token_embeds, src[..., None], axis=1)
  sft = jnp.take_along_axis(soft.astype(token_embeds.dtype), jnp.clip(j - s, 0, p - 1)[..., None], axis=1)
  embeds = jnp.where(in_soft[..., None], sft, tok)
  mask = jnp.where(in_soft, 1, jnp.where(tok_ok, jnp.take_along_axis(attention_mask, src, axis=1), 0))
  mask = mask.astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
  ti = jnp.arange(t)[None, :]
  token_index = jnp.where(ti < s, ti, ti + n).astype(jnp.int32)
  return embeds, mask, positions, token_index


def param_counts(model, *, num_codes: int = 64, code_tokens: int = 8,
                 bias_tokens: int = 12, soft_prompt_tokens: int = 8) -> dict[str, dict[str, int]]:
  """Trainable parameters per method, from a model config alone (no weights).

  `model` is anything `load_model` takes (a Hugging Face directory or its
  config.json, a `.gguf` file, a shipped model's name) or a `TrunkConfig`.

  Returns `{method: {"global": int, "per_class": int}}` for `persona_mux`
  (W and b global, m_i per class), `soft_prompt` (k tokens per class) and
  `random_codebook` (W fixed: only b global, m_i per class). Defaults are the
  paper's n=64, k=8, l=12 and an 8-token soft prompt.
  """
  from persomux.models.config import TrunkConfig
  from persomux.models.params import load_config

  d = (model if isinstance(model, TrunkConfig) else load_config(model)).d_model
  return {
      "persona_mux": {"global": (num_codes * code_tokens + bias_tokens) * d, "per_class": num_codes},
      "soft_prompt": {"global": 0, "per_class": soft_prompt_tokens * d},
      "random_codebook": {"global": bias_tokens * d, "per_class": num_codes},
  }
