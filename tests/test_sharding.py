"""Sharded training, generation and checkpoints on 8 simulated CPU devices."""

import os

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
  assert len(trunk8.groups[0].layers[0].mlp.gate_proj.weight[...].sharding.device_set) == 8
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


@pytest.mark.parametrize("explicit", [True, False], ids=["jax.make_mesh", "parse_mesh"])
def test_sharded_model_is_called_like_an_unsharded_one(model_dir, explicit):
  """`load_model(mesh=...)` gives a model that `model(input_ids=...)` and `model.embed` work on
  directly, outside and inside `jax.set_mesh`, with the unsharded model's values; also for a
  mesh of `jax.make_mesh`'s explicit axes."""
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor")) if explicit else sharding.parse_mesh("fsdp:2,tensor:4")
  trunk8, _ = persomux.load_model(model_dir, tokenizer=False, mesh=mesh)
  trunk1, _ = persomux.load_model(model_dir, tokenizer=False)
  assert trunk8.embed_tokens[...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  ids = jax.numpy.asarray(np.random.RandomState(1).randint(0, 64, (2, 7)))
  want, want_embeds = np.asarray(trunk1(input_ids=ids)), np.asarray(trunk1.embed(ids))
  np.testing.assert_allclose(np.asarray(trunk8(input_ids=ids)), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(trunk8.embed(ids)), want_embeds, atol=1e-6)
  with jax.set_mesh(mesh):
    np.testing.assert_allclose(np.asarray(trunk8(input_ids=ids)), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(trunk8.embed(ids)), want_embeds, atol=1e-6)


def test_kv_caches_shard_kv_heads_over_tensor(model_dir):
  mesh = sharding.parse_mesh("data:2,fsdp:2,tensor:2")
  trunk8, _ = persomux.load_model(model_dir, tokenizer=False, mesh=mesh)
  graphdef, state = nnx.split(trunk8)
  embeds = trunk8.embed(jax.numpy.zeros((4, 8), jax.numpy.int32))

  @jax.jit
  def prefill(state, embeds):
    return sampling.prefill_caches(nnx.merge(graphdef, state), embeds, jax.numpy.ones((4, 8), jax.numpy.int32), 16,
                                   mesh)[0]

  caches = prefill(state, embeds)
  k = caches["layers"][0][0]["k"]  # [reps, rows, kv_heads, slots / block, head_dim, block] on CPU
  block = sampling.key_block()
  assert k.shape == (1, 4, 2, 1, 8, block)  # the sliding layer's ring of 4, rounded up to one block
  assert tuple(k.sharding.spec)[:3] == (None, ("data", "fsdp"), "tensor")


def test_save_model_streams_one_tensor_at_a_time(tmp_path):
  """A sharded model saves without gathering itself in host memory: the peak of what
  is held is about one tensor, and transformers loads the shards it wrote."""
  import tracemalloc

  from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

  torch.manual_seed(0)
  hf = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)).eval()
  hf.save_pretrained(tmp_path / "src")
  total = sum(p.numel() * 4 for p in hf.parameters())  # 5.3 MB; the embedding and head are 2 MB each
  largest = max(p.numel() * 4 for p in hf.parameters())
  trunk8, _ = persomux.load_model(str(tmp_path / "src"), tokenizer=False, mesh=sharding.parse_mesh("fsdp:8"))
  tracemalloc.start()
  try:
    persomux.save_model(trunk8, None, str(tmp_path / "out"), max_shard_bytes=1_500_000)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < largest + total // 4, f"held {peak} bytes at once; the model has {total}, its largest tensor {largest}"
  assert len([f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")]) >= 3
  ids = torch.tensor(np.random.RandomState(2).randint(0, 4096, (2, 9)))
  with torch.no_grad():
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()(input_ids=ids).logits.numpy()
    ref = hf(input_ids=ids).logits.numpy()
  np.testing.assert_allclose(again, ref, atol=1e-5)
