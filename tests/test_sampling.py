"""The KV-cache sampler against transformers' generate, batching and seeds."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                          LlamaForCausalLM)

import persomux
from persomux import prompts, sampling
from persomux.models.config import FULL
from persomux.tokenizer import train_bpe_tokenizer

VOCAB = 120
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, eos_token_id=2, bos_token_id=1,
              pad_token_id=0)
BUILDERS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON)),
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**COMMON, sliding_window=5, query_pre_attn_scalar=24)),
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(
        **COMMON, sliding_window=5, layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
}


def _save(hf, path):
  torch.manual_seed(0)
  with torch.no_grad():
    for p in hf.parameters():  # larger weights: peaked, non-degenerate greedy paths
      p.copy_(torch.randn_like(p) * 0.5)
  hf.eval().save_pretrained(path)
  return hf


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def pair(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param)
  hf = _save(BUILDERS[request.param](), path)
  model, _ = persomux.load_model(str(path), tokenizer=False)
  return request.param, hf, model


def _hf_greedy(hf, n, **inputs):
  with torch.no_grad():
    out = hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
  return out.numpy()


def test_greedy_matches_transformers(pair):
  name, hf, model = pair
  ids = np.random.RandomState(1).randint(3, VOCAB, (2, 9))
  ref = _hf_greedy(hf, 16, input_ids=torch.tensor(ids))[:, 9:]
  ours = sampling.generate_ids(model, ids, max_new_tokens=16)
  np.testing.assert_array_equal(ours, ref, err_msg=name)


@pytest.mark.parametrize("unrolled", [False, True])
@pytest.mark.parametrize("block", [0, 8, 64])
def test_key_layouts_and_decode_loops_match_transformers(pair, block, unrolled, monkeypatch):
  """Keys cached like the values (TPU, GPU) or in transposed blocks of slots (64, the CPU
  default; 8: several blocks in these short caches, 64: the slots rounded up to one block), and
  the decode loop scanned (TPU, GPU) or unrolled on per-layer weights and caches (the CPU
  default): greedy decoding equals transformers every way, across sliding-window rings (Gemma)."""
  import jax

  name, hf, model = pair
  monkeypatch.setattr(sampling, "KEY_BLOCK", block)
  monkeypatch.setattr(sampling, "DECODE_UNROLLED", unrolled)
  jax.clear_caches()  # the layout and the loop are read when a function is traced
  try:
    ids = np.random.RandomState(7).randint(3, VOCAB, (2, 5))
    ref = _hf_greedy(hf, 12, input_ids=torch.tensor(ids))[:, 5:]
    caches = sampling.init_caches(model, 2, 32)
    assert caches["pos"][FULL].shape == (2, -(-32 // block) * block if block else 32)
    for c in (c for group in caches["layers"] for c in group):
      k, v = c["k"], c["v"]
      assert (v.shape[3] % block == 0 and k.shape == v.shape[:3] + (v.shape[3] // block, v.shape[4], block)
              if block else k.shape == v.shape)
    np.testing.assert_array_equal(sampling.generate_ids(model, ids, max_new_tokens=12), ref, err_msg=name)
  finally:
    jax.clear_caches()


@pytest.mark.parametrize("unrolled", [False, True])
def test_long_decode_crosses_cache_spans(pair, unrolled, monkeypatch):
  """150 greedy tokens after a 10-token prompt: the cache holds 272 slots, and the decode
  steps attend over 64 slots, then wider spans (scanned: 128, 256, 272; unrolled, where a
  span is a copy: 272), equal to transformers throughout."""
  import jax

  name, hf, model = pair
  monkeypatch.setattr(sampling, "DECODE_UNROLLED", unrolled)
  assert sampling._spans(272) == [64, 128, 256, 272] and sampling._spans(272, copied=True) == [64, 272]
  jax.clear_caches()
  try:
    ids = np.random.RandomState(11).randint(3, VOCAB, (2, 10))
    ref = _hf_greedy(hf, 150, input_ids=torch.tensor(ids))[:, 10:]
    np.testing.assert_array_equal(sampling.generate_ids(model, ids, max_new_tokens=150), ref, err_msg=name)
  finally:
    jax.clear_caches()


@pytest.mark.parametrize("vocab", [7, 128, 129, 32000])
def test_argmax_equals_numpy_with_ties_nans_and_infinities(vocab):
  """Greedy decoding's blocked argmax picks what numpy's argmax picks: the first maximum, the
  first NaN, index 0 of an all -inf row, across block edges and a vocabulary not of whole blocks."""
  rs = np.random.RandomState(vocab)
  x = rs.randn(6, vocab).astype(np.float32)
  x[1] = x[1, 3]  # all equal
  x[2, [vocab // 2, vocab - 1]] = np.nan
  x[3] = -np.inf
  x[4, [vocab // 3, vocab - 1]] = 50.0  # a tie across blocks
  x[5, vocab - 1] = np.inf
  got = np.asarray(sampling.argmax(jnp.asarray(x)))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, np.argmax(x, axis=-1))


def test_soft_prompt_matches_transformers_fed_spliced_embeds(pair):
  name, hf, model = pair
  ids = np.random.RandomState(2).randint(3, VOCAB, (2, 7))
  pm = prompts.PersonaMux(3, 64, num_codes=4, code_tokens=2, bias_tokens=3, init_std=0.5, rngs=nnx.Rngs(3))
  pm.mixtures[...] = jnp.ones((3, 4))
  class_ids, index = np.array([2, 0]), np.array([1, 4])
  soft, soft_len = pm(jnp.asarray(class_ids), 0.5)
  embeds, _, _, _ = prompts.splice(model.embed(jnp.asarray(ids)), jnp.ones((2, 7), jnp.int32), soft, soft_len,
                                   jnp.asarray(index))
  ref = _hf_greedy(hf, 12, inputs_embeds=torch.tensor(np.asarray(embeds)),
                   attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long))
  ours = sampling.generate_ids(model, ids, max_new_tokens=12,
                               soft_prompts=sampling.SoftPrompts(pm, class_ids, 0.5), soft_index=index)
  np.testing.assert_array_equal(ours, ref[:, -12:], err_msg=name)


def test_batched_rows_equal_rows_alone(pair):
  _, _, model = pair
  rs = np.random.RandomState(4)
  lengths = [5, 11, 8]
  ids = np.zeros((3, 11), np.int32)
  for r, n in enumerate(lengths):
    ids[r, :n] = rs.randint(3, VOCAB, n)
  pm = prompts.PersonaMux(3, 64, num_codes=4, code_tokens=2, bias_tokens=3, init_std=0.5, rngs=nnx.Rngs(5))
  pm.mixtures[...] = jnp.eye(3, 4) * 2
  classes, scales, index = [0, 1, 2], [1.0, 0.5, 0.0], [1, 3, 0]
  together = sampling.generate_ids(model, ids, np.array(lengths), max_new_tokens=10,
                                   soft_prompts=sampling.SoftPrompts(pm, classes, scales),
                                   soft_index=np.array(index))
  for r in range(3):
    alone = sampling.generate_ids(model, ids[r:r + 1, :lengths[r]], max_new_tokens=10,
                                  soft_prompts=sampling.SoftPrompts(pm, classes[r:r + 1], scales[r]),
                                  soft_index=np.array(index[r:r + 1]))
    np.testing.assert_array_equal(together[r], alone[0], err_msg=f"row {r}")


def test_sampling_is_reproducible_and_seeded(pair):
  _, _, model = pair
  ids = np.random.RandomState(6).randint(3, VOCAB, (4, 6))
  run = lambda seed, **kw: sampling.generate_ids(model, ids, max_new_tokens=12, temperature=5.0, seed=seed, **kw)
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.array_equal(run(0), run(1))
  np.testing.assert_array_equal(run(3, top_k=1), sampling.generate_ids(model, ids, max_new_tokens=12))
  np.testing.assert_array_equal(run(3, top_p=1e-6), sampling.generate_ids(model, ids, max_new_tokens=12))
  np.testing.assert_array_equal(run(5, top_k=5, top_p=0.9), run(5, top_k=5, top_p=0.9))


def test_generate_text_marker_eos_and_stop(tmp_path):
  texts = ["the cat sat on the mat", "a dog ran in the park", "hello there friend"] * 5
  tok = train_bpe_tokenizer(texts, vocab_size=VOCAB)
  _save(LlamaForCausalLM(LlamaConfig(**COMMON)), tmp_path)
  tok.save_pretrained(tmp_path)
  model, tokenizer = persomux.load_model(str(tmp_path))
  pm = prompts.PersonaMux(2, 64, num_codes=4, code_tokens=2, bias_tokens=3, init_std=0.5, rngs=nnx.Rngs(0))
  out = sampling.generate(
      model, tokenizer, ["the cat" + sampling.SOFT_MARKER + " sat", "hello"], max_new_tokens=8,
      soft_prompts=sampling.SoftPrompts(pm, [0, 1], 1.0))
  assert len(out) == 2 and all(isinstance(t, str) for t in out)
  # The marker places soft tokens where it stands: same as splicing by hand.
  pre = tokenizer("the cat")["input_ids"]
  ids = pre + tokenizer(" sat", add_special_tokens=False)["input_ids"]
  ref = sampling.generate_ids(model, np.array([ids]), max_new_tokens=8, soft_prompts=sampling.SoftPrompts(
      pm, [0], 1.0), soft_index=np.array([len(pre)]), eos_ids=[tokenizer.eos_token_id])
  expected = ref[0].tolist()
  if tokenizer.eos_token_id in expected:
    expected = expected[:expected.index(tokenizer.eos_token_id)]
  assert out[0] == tokenizer.decode(expected, skip_special_tokens=True)
  if out[1]:
    stop = out[1][len(out[1]) // 2:][:2] or out[1][:1]
    cut = sampling.generate(model, tokenizer, ["hello"], max_new_tokens=8, stop=[stop],
                            soft_prompts=sampling.SoftPrompts(pm, [1], 1.0))
    assert stop not in cut[0] and out[1].startswith(cut[0])


def test_stop_callback_ends_decoding_early(pair):
  _, _, model = pair
  ids = np.random.RandomState(7).randint(3, VOCAB, (2, 6))
  full = sampling.generate_ids(model, ids, max_new_tokens=24)
  calls = []

  def stop_fn(out):
    calls.append(out.shape[1])
    return [True, False]  # row 0 hits a stop string at the first check

  out = sampling.generate_ids(model, ids, max_new_tokens=24, stop_fn=stop_fn, stop_chunk=8)
  assert calls[0] == 8
  np.testing.assert_array_equal(out[0, :8], full[0, :8])
  assert (out[0, 8:] == 0).all()  # no decoding after the stop
  np.testing.assert_array_equal(out[1], full[1])
