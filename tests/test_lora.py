"""The LoRA baseline: adapters on the frozen trunk match PEFT's LoRA, train, resume and export."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import persomux
from persomux import stages, synthetic
from persomux.export import peft_export
from persomux.models import lora
from tests.test_trunk_models import build


@pytest.fixture(scope="module", params=["llama/gqa", "gemma2/softcap_sliding"])
def trunk_dir(request, tmp_path_factory):
  d = tmp_path_factory.mktemp("lora")
  build(request.param, str(d / "trunk"))
  return str(d / "trunk")


def _randomize(model, seed=0):
  """Nonzero B so the adapters change the output (a fresh B is zero)."""
  key = jax.random.key(seed)
  for _, _, a in lora.adapters(model):
    key, sub = jax.random.split(key)
    a.b[...] = 0.2 * jax.random.normal(sub, a.b.shape)


def test_attach_is_identity_then_detach_restores(trunk_dir):
  model, _ = persomux.load_model(trunk_dir, tokenizer=False)
  ids = jnp.asarray(np.random.RandomState(0).randint(3, 200, (2, 7)))
  before = np.asarray(model(ids))
  with lora.attached(model, lora.LoRAConfig(rank=2, targets=tuple(lora.TARGETS))):
    np.testing.assert_array_equal(np.asarray(model(ids)), before)  # B = 0: no change
    _randomize(model)
    assert np.abs(np.asarray(model(ids)) - before).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(model(ids)), before)
  assert not list(lora.adapters(model))


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), tuple(lora.TARGETS)])
def test_export_matches_peft_lora(trunk_dir, tmp_path, targets):
  model, _ = persomux.load_model(trunk_dir, tokenizer=False)
  cfg = lora.LoRAConfig(rank=3, alpha=6.0, targets=targets)
  lora.attach(model, cfg, seed=1)
  _randomize(model, 2)
  peft_export.write_peft_lora(str(tmp_path), model, cfg, base_model=trunk_dir)
  hf = AutoModelForCausalLM.from_pretrained(trunk_dir).eval()
  peft_model = PeftModel.from_pretrained(hf, str(tmp_path)).eval()  # peft's own loader
  assert sorted(peft_model.peft_config["default"].target_modules) == sorted(targets)
  ids = np.random.RandomState(1).randint(3, 200, (2, 9))
  with torch.no_grad():
    ref = peft_model(input_ids=torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref, atol=1e-4)
  # Every adapter tensor was loaded (PEFT leaves unknown names at their init: B = 0).
  sd = {k: v for k, v in peft_model.state_dict().items() if "lora_B" in k}
  assert len(sd) == model.config.num_layers * len(targets) and all(v.abs().sum() > 0 for v in sd.values())


def test_init_matches_peft_distribution(trunk_dir):
  """A and B start like PEFT's (Kaiming-uniform A with bound 1/sqrt(in), zero B), so training starts alike."""
  model, _ = persomux.load_model(trunk_dir, tokenizer=False)
  lora.attach(model, lora.LoRAConfig(rank=4, targets=("q_proj",)))
  hf = get_peft_model(AutoModelForCausalLM.from_pretrained(trunk_dir),
                      PeftLoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"]))
  ref_a = hf.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach().numpy()
  ours = np.asarray(next(lora.adapters(model))[2].a[...])
  assert ours.shape == ref_a.shape
  np.testing.assert_allclose(np.abs(ours).max(), np.abs(ref_a).max(), rtol=0.2)
  assert lora.count(model.config, lora.LoRAConfig(rank=4, targets=("q_proj",))) == \
      sum(p.numel() for n, p in hf.named_parameters() if "lora_" in n)


def test_train_lora_resumes_and_learns(tmp_path):
  """stages.train_lora lowers the held-out loss; a killed run resumes to the same adapters."""
  from tests.test_launch import ROOT  # noqa: F401  (configs importable)
  from configs import tiny
  from persomux.tokenizer import train_bpe_tokenizer
  from transformers import LlamaConfig, LlamaForCausalLM

  from persomux import data

  corpus = synthetic.make_corpus(synthetic.SyntheticCorpusConfig(num_personas=8, examples_per_persona=8))
  synthetic.write_jsonl(corpus, tmp_path / "records.jsonl")
  records, _ = data.load_records(str(tmp_path / "records.jsonl"))
  tok = train_bpe_tokenizer(synthetic.population_text(corpus), vocab_size=200)
  torch.manual_seed(0)
  LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                   ).save_pretrained(tmp_path / "trunk")
  tok.save_pretrained(tmp_path / "trunk")
  cfg = tiny.get_config()
  cfg.model_dir = str(tmp_path / "trunk")
  cfg.data.finetune_fraction = 0.25
  cfg.lora.steps = 8
  cfg.lora.learning_rate = 3e-2
  model, tok = stages.load_trunk(cfg)

  full = stages.train_lora(cfg, str(tmp_path / "a"), model, tok, records, progress=False)
  assert full["test_loss"] < full["initial_test_loss"]
  assert not list(lora.adapters(model))  # detached on return

  class Killed(Exception):
    pass

  def kill_at(step):
    if step == 5:
      raise Killed

  with pytest.raises(Killed):
    stages.train_lora(cfg, str(tmp_path / "b"), model, tok, records, progress=False, on_step=kill_at)
  lora.detach(model)
  resumed = stages.train_lora(cfg, str(tmp_path / "b"), model, tok, records, progress=False)
  assert resumed["test_loss"] == pytest.approx(full["test_loss"], abs=1e-6)

  meta = stages.load_lora(str(tmp_path / "a"), model)
  a = {k: np.asarray(v) for k, v in lora.peft_tensors(model).items()}
  lora.detach(model)
  stages.load_lora(str(tmp_path / "b"), model)
  for k, v in lora.peft_tensors(model).items():
    np.testing.assert_allclose(v, a[k], atol=1e-6)
  assert meta["lora"]["rank"] == 2 and meta["params"] == lora.count(model.config, lora.LoRAConfig(rank=2))
  lora.detach(model)
  assert json.load(open(os.path.join(tmp_path, "a", "split.json")))["finetune"] == meta["classes"]
