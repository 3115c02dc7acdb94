"""Sharded training, generation and checkpoints on 8 simulated CPU devices."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Gemma2Config, Gemma2ForCausalLM

import persomux
from persomux import prompts, sampling, sharding, train
from persomux.checkpoint import Checkpointer
from tests.test_train import RandomBatches

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("g2")
  torch.manual_seed(0)
  hf = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4))
  with torch.no_grad():
    for p in hf.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  hf.save_pretrained(d)
  return str(d)


def test_parse_mesh():
  mesh = sharding.parse_mesh("data:2,fsdp:2,tensor:2")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.parse_mesh(None).shape)["data"] == jax.device_count()
  assert dict(sharding.parse_mesh("tensor:2,data:-1").shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  with pytest.raises(ValueError, match="needs 16 devices; 8 are available"):
    sharding.parse_mesh("data:16")
  with pytest.raises(ValueError, match="axis 'model' is unknown"):
    sharding.parse_mesh("model:8")


def _prompt(classes=4):
  return prompts.PersonaMux(classes, 32, num_codes=4, code_tokens=2, bias_tokens=3, rngs=nnx.Rngs(1))


def _phases():
  o = train.OptimConfig(learning_rate=1e-3)
  data = RandomBatches(steps=3, b=8)
  return [train.Phase("warmup", prompts.Bias, data, 2, o), train.Phase("joint", prompts.PromptParam, data, 4, o)]


def test_sharded_training_equals_single_device(model_dir):
  mesh = sharding.parse_mesh("data:2,fsdp:2,tensor:2")
  trunk8, _ = persomux.load_model(model_dir, tokenizer=False, mesh=mesh)
  assert len(trunk8.layers[0].mlp.gate_proj[...].sharding.device_set) == 8
  trunk1, _ = persomux.load_model(model_dir, tokenizer=False)
  p8, p1 = _prompt(), _prompt()
  train.run_phases(trunk8, p8, _phases(), progress=False, mesh=mesh)
  train.run_phases(trunk1, p1, _phases(), progress=False)
  assert len(p8.mixtures[...].sharding.device_set) == 8
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(p8))), jax.tree.leaves(nnx.to_pure_dict(nnx.state(p1)))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_sharded_generation_equals_single_device(model_dir):
  mesh = sharding.parse_mesh("data:2,fsdp:2,tensor:2")
  trunk8, _ = persomux.load_model(model_dir, tokenizer=False, mesh=mesh)
  trunk1, _ = persomux.load_model(model_dir, tokenizer=False)
  ids = np.random.RandomState(0).randint(3, 64, (4, 7))
  pm = _prompt()
  soft = sampling.SoftPrompts(pm, [0, 1, 2, 3], [1.0, 0.5, 0.0, 1.0])
  a = sampling.generate_ids(trunk8, ids, max_new_tokens=10, soft_prompts=soft, soft_index=np.ones(4, np.int32))
  b = sampling.generate_ids(trunk1, ids, max_new_tokens=10, soft_prompts=soft, soft_index=np.ones(4, np.int32))
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("direction", ["8->1", "1->8"])
def test_checkpoint_moves_between_device_counts(tmp_path, direction):
  mesh = sharding.parse_mesh("data:8")
  src, dst = _prompt(8), _prompt(8)
  src.mixtures[...] = jax.random.normal(jax.random.key(0), src.mixtures.shape)
  if direction == "8->1":
    sharding.shard_module(src, mesh)
    assert src.mixtures[...].addressable_shards[0].data.shape == (1, 4)  # one class per device
  else:
    sharding.shard_module(dst, mesh)
  ck = Checkpointer(str(tmp_path))
  ck.save(1, {"prompt": src}, {"step": 1})
  ck.restore({"prompt": dst})
  np.testing.assert_array_equal(np.asarray(dst.mixtures[...]), np.asarray(src.mixtures[...]))
  want = 8 if direction == "1->8" else 1
  assert len(dst.codebook[...].sharding.device_set) == want
