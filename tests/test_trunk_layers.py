"""Per-layer parity with transformers' PyTorch modules.

These run before the whole-model tests (pytest collects this file first), so
a mismatch names its layer: norm, rotary, attention, MLP or decoder block.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (Gemma2Config, Gemma3TextConfig, GemmaConfig, LlamaConfig)
from transformers.models.gemma.modeling_gemma import GemmaMLP, GemmaRMSNorm
from transformers.models.gemma2.modeling_gemma2 import Gemma2DecoderLayer, Gemma2RotaryEmbedding
from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention, Gemma3RotaryEmbedding
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaMLP, LlamaRMSNorm,
                                                      LlamaRotaryEmbedding, apply_rotary_pos_emb)

from persomux.models import modeling
from persomux.models.config import FULL, SLIDING, TrunkConfig

ATOL = 1e-5


def _np(t: torch.Tensor) -> np.ndarray:
  return t.detach().float().numpy()


def _randomize(module: torch.nn.Module, seed: int, scale: float = 0.3):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * scale)


def _load_linear_weights(ours, hf, names):
  for ours_name, hf_name in names.items():
    getattr(ours, ours_name).weight[...] = jnp.asarray(_np(hf.get_submodule(hf_name).weight))


def _causal_additive_mask(t: int, window: int | None = None) -> torch.Tensor:
  q = torch.arange(t)[:, None]
  k = torch.arange(t)[None, :]
  ok = k <= q
  if window is not None:
    ok &= k > q - window
  return torch.where(ok, 0.0, torch.finfo(torch.float32).min)[None, None]


def _positions(b, t):
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_rmsnorm(gemma):
  hf = GemmaRMSNorm(16, eps=1e-6) if gemma else LlamaRMSNorm(16, eps=1e-6)
  _randomize(hf, 0)
  ours = modeling.RMSNorm(16, 1e-6, gemma=gemma)
  ours.weight[...] = jnp.asarray(_np(hf.weight))
  x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)) * 3
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(_np(x)))), _np(hf(x)), atol=ATOL, rtol=1e-5)


ROPE_CASES = {
    "default": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "linear": dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                    "rope_theta": 500000.0}),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rotary(case):
  hf_cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, **ROPE_CASES[case])
  rope = TrunkConfig.from_hf_dict(hf_cfg.to_dict() | {"model_type": "llama"}).rope_for(FULL)
  pos = torch.arange(40)[None].repeat(2, 1)
  x = torch.randn(2, 4, 40, 16, generator=torch.Generator().manual_seed(0))
  cos, sin = LlamaRotaryEmbedding(hf_cfg)(x, pos)
  ref, _ = apply_rotary_pos_emb(x, x, cos, sin)
  jcos, jsin = modeling.rope_cos_sin(jnp.asarray(pos.numpy()), modeling.rope_inv_freq(rope, 16), jnp.float32)
  np.testing.assert_allclose(np.asarray(jcos), _np(cos), atol=1e-5)
  ours = modeling.apply_rope(jnp.asarray(_np(x.transpose(1, 2))), jcos, jsin)
  np.testing.assert_allclose(np.asarray(ours), _np(ref.transpose(1, 2)), atol=1e-4)


def test_gemma3_rotary_per_layer_type():
  hf_cfg = Gemma3TextConfig(hidden_size=64, num_attention_heads=4, head_dim=16, num_hidden_layers=2,
                            layer_types=[SLIDING, FULL],
                            rope_parameters={FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                             SLIDING: {"rope_type": "default", "rope_theta": 1e4}})
  cfg = TrunkConfig.from_hf_dict(hf_cfg.to_dict())
  pos = torch.arange(30)[None]
  x = torch.zeros(1, 30, 16)
  rot = Gemma3RotaryEmbedding(hf_cfg)
  for kind in (FULL, SLIDING):
    cos, _ = rot(x, pos, layer_type=kind)
    jcos, _ = modeling.rope_cos_sin(jnp.asarray(pos.numpy()),
                                    modeling.rope_inv_freq(cfg.rope_for(kind), 16), jnp.float32)
    np.testing.assert_allclose(np.asarray(jcos), _np(cos), atol=1e-5, err_msg=kind)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_llama_attention(kv_heads, bias):
  hf_cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16,
                       attention_bias=bias, intermediate_size=128, num_hidden_layers=1)
  hf_cfg._attn_implementation = "eager"
  hf = LlamaAttention(hf_cfg, layer_idx=0).eval()
  _randomize(hf, 0)
  cfg = TrunkConfig.from_hf_dict(hf_cfg.to_dict() | {"model_type": "llama"})
  ours = modeling.Attention(cfg, FULL, dtype=jnp.float32, rngs=None)
  for n in ("q", "k", "v", "o"):
    getattr(ours, f"{n}_proj").weight[...] = jnp.asarray(_np(getattr(hf, f"{n}_proj").weight))
    if bias:
      getattr(ours, f"{n}_proj").bias[...] = jnp.asarray(_np(getattr(hf, f"{n}_proj").bias))
  b, t = 2, 9
  x = torch.randn(b, t, 64, generator=torch.Generator().manual_seed(2))
  pos = torch.arange(t)[None].repeat(b, 1)
  cos, sin = LlamaRotaryEmbedding(hf_cfg)(x, pos)
  ref, _ = hf(x, (cos, sin), _causal_additive_mask(t))
  jpos = _positions(b, t)
  jcos, jsin = modeling.rope_cos_sin(jpos, modeling.rope_inv_freq(cfg.rope_for(FULL), 16), jnp.float32)
  mask = modeling.attention_mask(jpos, jpos, jnp.ones((b, t), jnp.int32), None)
  out, _ = ours(jnp.asarray(_np(x)), jcos, jsin, mask)
  np.testing.assert_allclose(np.asarray(out), _np(ref), atol=1e-4)


def test_gemma3_attention_qk_norm_sliding():
  hf_cfg = Gemma3TextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_hidden_layers=1, sliding_window=4, query_pre_attn_scalar=24,
                            layer_types=[SLIDING])
  hf_cfg._attn_implementation = "eager"
  hf = Gemma3Attention(hf_cfg, layer_idx=0).eval()
  _randomize(hf, 3)
  cfg = TrunkConfig.from_hf_dict(hf_cfg.to_dict())
  ours = modeling.Attention(cfg, SLIDING, dtype=jnp.float32, rngs=None)
  _load_linear_weights(ours, hf, {f"{n}_proj": f"{n}_proj" for n in "qkvo"})
  ours.q_norm.weight[...] = jnp.asarray(_np(hf.q_norm.weight))
  ours.k_norm.weight[...] = jnp.asarray(_np(hf.k_norm.weight))
  b, t = 1, 11
  x = torch.randn(b, t, 64, generator=torch.Generator().manual_seed(4))
  pos = torch.arange(t)[None]
  cos, sin = Gemma3RotaryEmbedding(hf_cfg)(x, pos, layer_type=SLIDING)
  ref, _ = hf(x, (cos, sin), _causal_additive_mask(t, window=4))
  jpos = _positions(b, t)
  jcos, jsin = modeling.rope_cos_sin(jpos, modeling.rope_inv_freq(cfg.rope_for(SLIDING), 16), jnp.float32)
  mask = modeling.attention_mask(jpos, jpos, jnp.ones((b, t), jnp.int32), 4)
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(_np(x)), jcos, jsin, mask)[0]), _np(ref), atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_mlp(family):
  if family == "llama":
    hf_cfg = LlamaConfig(hidden_size=64, intermediate_size=128, hidden_act="silu")
    hf = LlamaMLP(hf_cfg)
  else:
    hf_cfg = GemmaConfig(hidden_size=64, intermediate_size=128, hidden_act="gelu_pytorch_tanh")
    hf = GemmaMLP(hf_cfg)
  _randomize(hf, 5)
  cfg = TrunkConfig.from_hf_dict(hf_cfg.to_dict() | {"model_type": family})
  ours = modeling.MLP(cfg, dtype=jnp.float32, rngs=None)
  _load_linear_weights(ours, hf, {f"{n}_proj": f"{n}_proj" for n in ("gate", "up", "down")})
  x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(6))
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(_np(x)))), _np(hf(x)), atol=1e-4)


def test_gemma2_decoder_layer_softcap_sandwich_norms():
  hf_cfg = Gemma2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, num_hidden_layers=1, attn_logit_softcapping=5.0,
                        query_pre_attn_scalar=24, sliding_window=4, layer_types=[SLIDING])
  hf_cfg._attn_implementation = "eager"
  hf = Gemma2DecoderLayer(hf_cfg, layer_idx=0).eval()
  _randomize(hf, 7)
  cfg = TrunkConfig.from_hf_dict(hf_cfg.to_dict())
  ours = modeling.DecoderLayer(cfg, SLIDING, dtype=jnp.float32, rngs=None)
  _load_linear_weights(ours.attn, hf.self_attn, {f"{n}_proj": f"{n}_proj" for n in "qkvo"})
  _load_linear_weights(ours.mlp, hf.mlp, {f"{n}_proj": f"{n}_proj" for n in ("gate", "up", "down")})
  for ours_norm, hf_norm in [("attn_norm", "input_layernorm"), ("attn_post_norm", "post_attention_layernorm"),
                             ("mlp_norm", "pre_feedforward_layernorm"),
                             ("mlp_post_norm", "post_feedforward_layernorm")]:
    getattr(ours, ours_norm).weight[...] = jnp.asarray(_np(getattr(hf, hf_norm).weight))
  b, t = 1, 10
  x = torch.randn(b, t, 64, generator=torch.Generator().manual_seed(8))
  pos = torch.arange(t)[None]
  cos, sin = Gemma2RotaryEmbedding(hf_cfg)(x, pos)
  ref = hf(x, attention_mask=_causal_additive_mask(t, window=4), position_embeddings=(cos, sin),
           position_ids=pos)
  ref = ref[0] if isinstance(ref, tuple) else ref
  jpos = _positions(b, t)
  jcos, jsin = modeling.rope_cos_sin(jpos, modeling.rope_inv_freq(cfg.rope_for(SLIDING), 16), jnp.float32)
  mask = modeling.attention_mask(jpos, jpos, jnp.ones((b, t), jnp.int32), 4)
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(_np(x)), jcos, jsin, mask)[0]), _np(ref), atol=1e-4)


@pytest.mark.parametrize("rows, out, splits", [(8, 1376, 16), (8, 512, 8), (8, 320, 4), (3, 96, 1), (65, 1024, 1)])
def test_few_row_products_split_outputs_and_equal_the_product(rows, out, splits):
  """Under `few_row_products` (decode steps), a product of at most 64 rows runs over blocks of
  at least 64 of its outputs as one batched product; the values equal x @ w.T + b in float64."""
  rs = np.random.RandomState(rows + out)
  x, w, b = rs.randn(1, rows, 48), rs.randn(out, 48), rs.randn(out)
  with modeling.few_row_products():
    assert modeling._out_splits(rows, out) == splits
    got = jax.jit(modeling.linear)(*(jnp.asarray(a, jnp.float32) for a in (x, w, b)))
  assert modeling._out_splits(rows, out) == 1  # outside it: one product
  np.testing.assert_allclose(np.asarray(got), x @ w.T + b, atol=1e-4)
