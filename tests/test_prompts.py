"""Prompt parameterizations, splicing and parameter counts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import persomux
from persomux import prompts


def test_persona_mux_is_bias_then_mixture_of_codes():
  pm = prompts.PersonaMux(5, 6, num_codes=4, code_tokens=3, bias_tokens=2, rngs=nnx.Rngs(0))
  pm.mixtures[...] = jax.random.normal(jax.random.key(1), (5, 4))
  ids = jnp.array([3, 0])
  soft, n = pm(ids, 1.0)
  assert soft.shape == (2, 5, 6) and n.tolist() == [5, 5]
  w, b, m = np.asarray(pm.codebook[...]), np.asarray(pm.bias[...]), np.asarray(pm.mixtures[...])
  for row, c in enumerate([3, 0]):
    expected = np.concatenate([b, np.tensordot(m[c], w, axes=1)], axis=0)
    np.testing.assert_allclose(np.asarray(soft[row]), expected, atol=1e-6)


def test_bias_scale_full_half_none_per_row():
  pm = prompts.PersonaMux(2, 4, num_codes=3, code_tokens=2, bias_tokens=3, rngs=nnx.Rngs(0))
  soft, n = pm(jnp.array([0, 1, 1]), jnp.array([1.0, 0.5, 0.0]))
  b = np.asarray(pm.bias[...])
  persona = np.asarray(pm.persona_tokens(jnp.array([0, 1, 1])))
  assert n.tolist() == [5, 5, 2]
  np.testing.assert_allclose(soft[0, :3], b, atol=1e-6)
  np.testing.assert_allclose(soft[1, :3], 0.5 * b, atol=1e-6)
  # Bias removed entirely: the row starts with the persona tokens.
  np.testing.assert_allclose(soft[2, :2], persona[2], atol=1e-6)


def test_soft_prompt_baseline_is_independent_per_class():
  sp = prompts.SoftPrompt(3, 4, num_tokens=8, rngs=nnx.Rngs(0))
  soft, n = sp(jnp.array([2, 2, 0]))
  assert soft.shape == (3, 8, 4) and n.tolist() == [8, 8, 8]
  np.testing.assert_array_equal(soft[0], sp.prompts[...][2])


def test_random_codebook_is_not_a_trainable_param():
  rc = prompts.RandomCodebook(3, 4, num_codes=2, code_tokens=2, bias_tokens=1, rngs=nnx.Rngs(0))
  trainable = nnx.state(rc, prompts.PromptParam)
  assert "codebook" not in trainable and "mixtures" in trainable


def test_splice_places_soft_tokens_per_row_with_padding():
  b, t, d = 3, 6, 2
  tok = jnp.arange(b * t * d, dtype=jnp.float32).reshape(b, t, d) + 100
  mask = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
  soft = -jnp.arange(b * 3 * d, dtype=jnp.float32).reshape(b, 3, d) - 1
  soft_len = jnp.array([3, 2, 3])
  index = jnp.array([1, 3, 2])
  emb, m, pos, ti = prompts.splice(tok, mask, soft, soft_len, index)
  assert emb.shape == (b, t + 3, d)
  for r in range(b):
    s, n, real = int(index[r]), int(soft_len[r]), int(mask[r].sum())
    np.testing.assert_array_equal(emb[r, :s], tok[r, :s])
    np.testing.assert_array_equal(emb[r, s:s + n], soft[r, :n])
    np.testing.assert_array_equal(emb[r, s + n:s + n + real - s], tok[r, s:real])
    assert m[r].tolist() == [1] * (real + n) + [0] * (t + 3 - real - n)
    assert pos[r, :real + n].tolist() == list(range(real + n))
    np.testing.assert_array_equal(emb[r, ti[r, :real]], tok[r, :real])


def test_param_counts_llama3_8b_match_paper(tmp_path):
  cfg = persomux.TrunkConfig.llama3_8b().to_hf_dict()
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  counts = persomux.param_counts(str(tmp_path))
  assert counts["persona_mux"] == {"global": 2_146_304, "per_class": 64}
  assert counts["soft_prompt"]["per_class"] == 32_768
  assert persomux.param_counts(str(tmp_path / "config.json")) == counts
  # The module's actual parameters agree with the count.
  pm = nnx.eval_shape(lambda: prompts.PersonaMux(1, 4096, rngs=nnx.Rngs(0)))
  sizes = {k: int(np.prod(v.shape)) for k, v in nnx.to_pure_dict(nnx.state(pm)).items()}
  assert sizes["codebook"] + sizes["bias"] == 2_146_304 and sizes["mixtures"] == 64
