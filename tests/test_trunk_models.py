"""Whole-model parity with transformers for every supported family and variant.

Each variant is a tiny random transformers model saved to a temp directory
(safetensors + a locally trained tokenizer), loaded by persomux, and compared
on fp32 logits. The per-layer tests in test_trunk_layers.py run first.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3Config,
                          Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3TextConfig, GemmaConfig,
                          GemmaForCausalLM, LlamaConfig, LlamaForCausalLM)

import persomux
from persomux.tokenizer import train_bpe_tokenizer
from tests.conftest import PARITY

VOCAB = 300
SEQ = 14  # longer than every sliding window below
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8, "rope_theta": 500000.0}
SLIDE3 = ["sliding_attention", "full_attention", "sliding_attention"]


def _llama(**kw):
  return lambda: LlamaForCausalLM(LlamaConfig(**(TINY | kw)))


VARIANTS = {
    "llama/mha": _llama(num_key_value_heads=4),
    "llama/gqa": _llama(num_key_value_heads=2),
    "llama/mqa": _llama(num_key_value_heads=1),
    "llama/tied": _llama(tie_word_embeddings=True),
    "llama/llama3_rope": _llama(rope_parameters=LLAMA3_ROPE),
    "llama/linear_rope": _llama(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    "llama/attn_mlp_bias": _llama(attention_bias=True, mlp_bias=True),
    "llama/v4_config_keys": _llama(rope_parameters=LLAMA3_ROPE),
    "llama/sharded": _llama(),
    "gemma/mqa": lambda: GemmaForCausalLM(GemmaConfig(**(TINY | dict(num_key_value_heads=1)))),
    "gemma2/softcap_sliding": lambda: Gemma2ForCausalLM(Gemma2Config(
        **TINY, sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0)),
    "gemma3/text": lambda: Gemma3ForCausalLM(Gemma3TextConfig(
        **TINY, sliding_window=4, query_pre_attn_scalar=24, layer_types=SLIDE3,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    "gemma3/multimodal": lambda: Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=TINY | dict(sliding_window=4, layer_types=SLIDE3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8), mm_tokens_per_image=4)),
}


def _to_v4_keys(path):
  """Rewrites config.json as transformers 4.x wrote it."""
  cfg = json.load(open(path))
  rope = cfg.pop("rope_parameters")
  cfg["rope_theta"] = rope.pop("rope_theta")
  cfg["rope_scaling"] = rope if rope.get("rope_type") != "default" else None
  cfg["torch_dtype"] = cfg.pop("dtype", "float32")
  json.dump(cfg, open(path, "w"))


def build(name, directory):
  torch.manual_seed(sum(map(ord, name)))
  hf = VARIANTS[name]().eval()
  with torch.no_grad():  # random norms too, so (1 + w) vs w mistakes show
    for p in hf.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  kw = {"max_shard_size": "60KB"} if name == "llama/sharded" else {}
  hf.save_pretrained(directory, **kw)
  train_bpe_tokenizer(["hello there the cat sat on the mat"] * 4, vocab_size=VOCAB).save_pretrained(directory)
  if name == "llama/v4_config_keys":
    _to_v4_keys(os.path.join(directory, "config.json"))
  return hf


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp(request.param.replace("/", "_")))
  hf = build(request.param, directory)
  model, tok = persomux.load_model(directory)
  return request.param, directory, hf, model, tok


def _ids(seed, shape=(2, SEQ)):
  return np.random.RandomState(seed).randint(3, VOCAB, shape)


def _hf_logits(hf, ids, mask=None):
  with torch.no_grad():
    kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
    return hf(input_ids=torch.tensor(ids), **kw).logits.float().numpy()


def test_logits_match_transformers(variant):
  name, directory, hf, model, tok = variant
  if name == "llama/sharded":
    assert os.path.isfile(os.path.join(directory, "model.safetensors.index.json"))
  if name == "llama/v4_config_keys":
    assert "rope_scaling" in json.load(open(os.path.join(directory, "config.json")))
  ids = _ids(0)
  ref = _hf_logits(hf, ids)
  ours = np.asarray(model(jnp.asarray(ids)))
  delta = float(np.abs(ours - ref).max())
  PARITY[name] = delta
  assert np.abs(ref).max() > 1.0  # not a degenerate all-zero comparison
  assert delta < 1e-4, f"{name}: max |Δlogit| = {delta}"
  assert tok is not None and len(tok) <= model.config.vocab_size


def test_inputs_embeds_equal_input_ids(variant):
  _, _, _, model, _ = variant
  ids = jnp.asarray(_ids(1))
  np.testing.assert_allclose(np.asarray(model(inputs_embeds=model.embed(ids))), np.asarray(model(ids)), atol=1e-5)


def test_right_padded_batch_equals_rows_alone(variant):
  name, _, _, model, _ = variant
  lengths = [SEQ, 6, 10]
  ids = _ids(2, (3, SEQ))
  mask = (np.arange(SEQ)[None] < np.array(lengths)[:, None]).astype(np.int32)
  ids = np.where(mask, ids, 0)
  batch = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  for r, n in enumerate(lengths):
    alone = np.asarray(model(jnp.asarray(ids[r:r + 1, :n])))
    np.testing.assert_allclose(batch[r, :n], alone[0], atol=1e-4, err_msg=f"{name} row {r}")


ROUND_TRIP = ["llama/gqa", "llama/tied", "llama/attn_mlp_bias", "gemma/mqa", "gemma2/softcap_sliding",
              "gemma3/text", "gemma3/multimodal"]


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_save_model_round_trip(name, tmp_path):
  hf = build(name, str(tmp_path / "src"))
  model, tok = persomux.load_model(str(tmp_path / "src"))
  persomux.save_model(model, tok, str(tmp_path / "out"))
  ids = _ids(3)
  again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  np.testing.assert_allclose(_hf_logits(again, ids), _hf_logits(hf, ids), atol=1e-5)
  reloaded, tok2 = persomux.load_model(str(tmp_path / "out"))
  np.testing.assert_array_equal(np.asarray(reloaded(jnp.asarray(ids))), np.asarray(model(jnp.asarray(ids))))
  assert tok2("hello there")["input_ids"] == tok("hello there")["input_ids"]


def test_bfloat16_load(tmp_path):
  build("gemma2/softcap_sliding", str(tmp_path))
  m32, _ = persomux.load_model(str(tmp_path), tokenizer=False)
  m16, _ = persomux.load_model(str(tmp_path), dtype="bfloat16", tokenizer=False)
  assert m16.groups[0].layers[0].attn.q_proj.weight[...].dtype == jnp.bfloat16
  ids = jnp.asarray(_ids(4))
  a, b = np.asarray(m32(ids)), np.asarray(m16(ids))
  assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


@pytest.mark.parametrize("name", ["llama/gqa", "gemma2/softcap_sliding", "gemma3/text"])
def test_bfloat16_checkpoint_loads_in_its_own_dtype(name, tmp_path):
  """A checkpoint transformers saved in bfloat16 loads in bfloat16 when no dtype
  is given (config.json `dtype`), and upcasts exactly when float32 is asked for."""
  build(name, str(tmp_path)).to(torch.bfloat16).save_pretrained(str(tmp_path))
  assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
  ids = _ids(5)
  model, _ = persomux.load_model(str(tmp_path), tokenizer=False)
  assert model.dtype == jnp.bfloat16 and model.groups[0].layers[0].mlp.up_proj.weight[...].dtype == jnp.bfloat16
  ref = _hf_logits(AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16).eval(), ids)
  delta = float(np.abs(np.asarray(model(jnp.asarray(ids))) - ref).max())
  # bf16 keeps 8 bits of mantissa: two implementations that round intermediates
  # at different points agree to a few bf16 ulps of the logit scale, not to 1e-4.
  assert delta < 0.05 * np.abs(ref).max(), f"{name}: bf16 max |Δlogit| = {delta}"
  m32, _ = persomux.load_model(str(tmp_path), dtype="float32", tokenizer=False)
  up = _hf_logits(AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval(), ids)
  delta32 = float(np.abs(np.asarray(m32(jnp.asarray(ids))) - up).max())
  PARITY[f"{name}/from_bf16"] = delta32
  assert delta32 < 1e-4, f"{name}: max |Δlogit| = {delta32}"
