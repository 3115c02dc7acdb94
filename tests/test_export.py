"""Export: PEFT prompt-tuning adapters and torch_prompts match persomux's logits."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import PeftModel
from transformers import AutoModelForCausalLM

import persomux
from persomux import prompts, stages
from persomux.export import peft_export
from persomux.export.torch_prompts import PersonaMuxPrompts
from tests.test_launch import run
from tests.test_trunk_models import build


@pytest.fixture(scope="module", params=["llama/gqa", "gemma2/softcap_sliding"])
def trained(request, tmp_path_factory):
  d = tmp_path_factory.mktemp("export")
  build(request.param, str(d / "trunk"))
  model, _ = persomux.load_model(str(d / "trunk"), tokenizer=False)
  pm = prompts.PersonaMux(3, model.config.d_model, num_codes=4, code_tokens=2, bias_tokens=3, init_std=0.3,
                          rngs=nnx.Rngs(0))
  pm.mixtures[...] = jnp.asarray(np.random.RandomState(0).randn(3, 4), jnp.float32)
  return d, model, pm


def _ours(model, pm, ids, cid, index, scale):
  soft, n = pm(jnp.asarray([cid] * len(ids)), scale)
  embeds, mask, pos, _ = prompts.splice(model.embed(jnp.asarray(ids)), jnp.ones(ids.shape, jnp.int32), soft, n,
                                        jnp.full((len(ids),), index, jnp.int32))
  return np.asarray(model(inputs_embeds=embeds, attention_mask=mask, positions=pos))


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.0])
def test_peft_adapter_matches_prefix_placement(trained, tmp_path, scale):
  d, model, pm = trained
  out = tmp_path / "adapter"
  peft_export.write_peft_prompt(str(out), peft_export.soft_prompt(pm, 1, scale), model.config)
  hf = AutoModelForCausalLM.from_pretrained(str(d / "trunk")).eval()
  peft_model = PeftModel.from_pretrained(hf, str(out)).eval()  # peft's own loader
  assert peft_model.peft_config["default"].num_virtual_tokens == (2 if scale == 0 else 5)
  ids = np.random.RandomState(1).randint(3, 300, (2, 9))
  with torch.no_grad():
    ref = peft_model(input_ids=torch.tensor(ids)).logits.numpy()
  ours = _ours(model, pm, ids, 1, 0, scale)[:, :ref.shape[1]]  # no bias: fewer tokens, padding after
  np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_torch_prompts_matches_mid_prompt_placement(trained, tmp_path):
  d, model, pm = trained
  path = peft_export.write_state(str(tmp_path), pm, ["a", "b", "c"], {"num_codes": 4})
  tp = PersonaMuxPrompts.from_file(path)
  assert tp.classes == ["a", "b", "c"] and tuple(tp.codebook.shape) == (4, 2, model.config.d_model)
  hf = AutoModelForCausalLM.from_pretrained(str(d / "trunk")).eval()
  ids = np.random.RandomState(2).randint(3, 300, (2, 9))
  with torch.no_grad():
    embeds, mask = tp.splice(hf, torch.tensor(ids), None, ["c", "c"], [3, 3], bias_scale=0.5)
    ref = hf(inputs_embeds=embeds, attention_mask=mask).logits.numpy()
  np.testing.assert_allclose(_ours(model, pm, ids, 2, 3, 0.5), ref, atol=1e-4)


def test_export_launch(trained, tmp_path):
  d, model, pm = trained
  workdir = tmp_path / "run"
  stages.save_run({"model_dir": str(d / "trunk"), "dtype": "float32"}, str(workdir))
  stages.save_prompt(str(workdir), "finetune_persona_mux", pm, {
      "method": "persona_mux", "classes": ["a", "b", "c"],
      "prompt": {"num_codes": 4, "code_tokens": 2, "bias_tokens": 3, "init_std": 0.3, "soft_prompt_tokens": 2}})
  run("export.py", f"--workdir={workdir}", "--format=peft", "--persona=b", "--bias_scale=0.5",
      f"--out={tmp_path / 'peft'}")
  cfg = json.load(open(tmp_path / "peft" / "adapter_config.json"))
  assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 5
  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(d / "trunk")), str(tmp_path / "peft"))
  run("export.py", f"--workdir={workdir}", "--format=safetensors", "--stage=finetune_persona_mux",
      f"--out={tmp_path / 'state'}")
  tp = PersonaMuxPrompts.from_file(str(tmp_path / "state" / "persona_mux.safetensors"))
  np.testing.assert_allclose(tp.mixtures.numpy(), np.asarray(pm.mixtures[...]))
  bad = run("export.py", f"--workdir={workdir}", "--format=peft", "--persona=zed", f"--out={tmp_path / 'x'}",
            check=False)
  assert bad.returncode != 0 and "zed" in bad.stderr and not os.path.exists(tmp_path / "x")


def test_export_launch_lora_and_trunk(trained, tmp_path):
  """--lora writes the LoRA baseline as a PEFT LoRA adapter; --export_trunk=always ships the trunk with it."""
  from persomux.checkpoint import Part
  from persomux.models import lora

  d, model, _ = trained
  workdir = tmp_path / "run"
  stages.save_run({"model_dir": str(d / "trunk"), "dtype": "float32"}, str(workdir))
  missing = run("export.py", f"--workdir={workdir}", "--lora", f"--out={tmp_path / 'none'}", check=False)
  assert missing.returncode != 0 and "prompt/lora" in missing.stderr
  cfg = lora.LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "down_proj"))
  with lora.attached(model, cfg, seed=3):
    for _, _, a in lora.adapters(model):
      a.b[...] = 0.1 * jnp.ones(a.b.shape)
    stages.save_prompt(str(workdir), "lora", Part(model, lora.LoRAParam),
                       {"method": "lora", "lora": cfg.to_dict(), "classes": ["a"]}, key="adapters")
    ids = np.random.RandomState(3).randint(3, 300, (2, 9))
    ours = np.asarray(model(jnp.asarray(ids)))
  out = tmp_path / "lora"
  run("export.py", f"--workdir={workdir}", "--lora", "--export_trunk=always", f"--out={out}")
  base = json.load(open(out / "adapter_config.json"))["base_model_name_or_path"]
  assert base == str(out / "base_model")
  peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(out)).eval()
  with torch.no_grad():
    ref = peft_model(input_ids=torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-4)
