"""Scanned layer groups, remat policies and block-wise attention.

The trunk stacks its layers per group of a repeating pattern and scans over
them; these tests check the grouping, a Gemma-3-1B-shaped trunk (a 6-layer
pattern plus a tail group) against transformers, that every remat policy
gives the same gradients, and that block-wise attention equals attention over
the whole sequence while keeping no `[seq, seq]` scores for the backward pass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

import persomux
from persomux import sampling
from persomux.models import modeling
from persomux.models.config import FULL, SLIDING, LayerGroup, TrunkConfig, group_layers

S, F = SLIDING, FULL


def test_layer_groups():
  assert group_layers((F,) * 32) == (LayerGroup(0, (F,), 32),)  # Llama
  assert group_layers((S, F) * 23) == (LayerGroup(0, (S, F), 23),)  # Gemma 2 27B
  assert group_layers(((S,) * 5 + (F,)) * 3) == (LayerGroup(0, (S,) * 5 + (F,), 3),)  # Gemma 3 270M
  # Gemma 3 1B: 26 layers = 4 x (5 sliding + 1 full) + a tail of 2 sliding layers.
  assert group_layers(((S,) * 5 + (F,)) * 4 + (S, S)) == (LayerGroup(0, (S,) * 5 + (F,), 4), LayerGroup(24, (S,), 2))
  assert group_layers((S, F, S)) == (LayerGroup(0, (S, F, S), 1),)  # nothing repeats: one pass
  g = LayerGroup(24, (S,), 2)
  assert [g.layer_index(r, 0) for r in range(2)] == [24, 25]


@pytest.fixture(scope="module")
def gemma3_1b_like(tmp_path_factory):
  """A tiny Gemma 3 with 1B's layer layout: 2 x (5 sliding + 1 full) + 2 sliding."""
  path = tmp_path_factory.mktemp("g3tail")
  torch.manual_seed(0)
  hf = Gemma3ForCausalLM(Gemma3TextConfig(
      vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=14, num_attention_heads=2,
      num_key_value_heads=1, head_dim=16, sliding_window=4, query_pre_attn_scalar=16, bos_token_id=1,
      eos_token_id=2, pad_token_id=0)).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  hf.save_pretrained(path)
  model, _ = persomux.load_model(str(path), tokenizer=False)
  return hf, model


def test_tail_group_matches_transformers(gemma3_1b_like):
  hf, model = gemma3_1b_like
  assert [(g.kinds, g.reps) for g in model.groups] == [((S,) * 5 + (F,), 2), ((S,), 2)]
  assert model.groups[0].layers[5].attn.q_proj.weight.shape == (2, 32, 32)  # [reps, out, in]
  ids = np.random.RandomState(0).randint(3, 96, (2, 11))
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    greedy = hf.generate(torch.tensor(ids), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                         pad_token_id=0).numpy()[:, 11:]
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref, atol=1e-4)
  np.testing.assert_array_equal(sampling.generate_ids(model, ids, max_new_tokens=10), greedy)


def _tiny(family, **kw):
  if family == "gemma2":
    cfg = TrunkConfig(family="gemma2", vocab_size=64, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2,
                      head_dim=8, ffn_dim=64, activation="gelu_pytorch_tanh",
                      layer_types=(S, F) * 2, sliding_window=5, attn_softcap=5.0, final_softcap=3.0, **kw)
  else:
    cfg = TrunkConfig.llama(vocab_size=64, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, ffn_dim=64, **kw)
  return cfg


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_remat_policies_give_the_same_gradients(family):
  cfg = _tiny(family)
  base = modeling.Trunk(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(base)
  embeds = 0.5 * jax.random.normal(jax.random.key(1), (2, 9, 32))
  mask = jnp.asarray(np.arange(9)[None] < np.array([[9], [6]]), jnp.int32)

  def grads(remat):
    model = nnx.merge(graphdef, state)
    model.remat = modeling.remat_policy(remat)
    loss = lambda e: jnp.sum(jnp.sin(model(inputs_embeds=e, attention_mask=mask)))
    return jax.jit(jax.grad(loss))(embeds)

  ref = grads("none")
  assert np.abs(ref).max() > 1e-3
  for remat in ("full", "save_qkv_mlp"):
    np.testing.assert_allclose(np.asarray(grads(remat)), np.asarray(ref), atol=1e-5, err_msg=remat)
  assert (modeling.remat_policy(True), modeling.remat_policy(False)) == ("full", "none")  # today's bools
  with pytest.raises(ValueError, match="remat='some'"):
    modeling.remat_policy("some")


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_blockwise_attention_equals_whole(softcap):
  b, t, n, kv, h = 2, 37, 4, 2, 8
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (b, t, n, h))
  k = jax.random.normal(ks[1], (b, t, kv, h))
  v = jax.random.normal(ks[2], (b, t, kv, h))
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  valid = jnp.asarray(np.arange(t)[None] < np.array([[t], [20]]), jnp.int32)
  mask = modeling.attention_mask(pos, pos, valid, 6)
  f = lambda chunk: lambda q, k, v: modeling.attend(q, k, v, mask, scale=0.3, softcap=softcap, chunk=chunk)
  both = jax.jit(lambda q, k, v: (f(8)(q, k, v), f(t)(q, k, v)))
  blocks, whole = both(q, k, v)
  np.testing.assert_allclose(np.asarray(blocks), np.asarray(whole), atol=1e-6)
  loss = lambda chunk: lambda q, k, v: jnp.sum(jnp.sin(f(chunk)(q, k, v)))
  grads = jax.jit(lambda q, k, v: [jax.grad(loss(c), argnums=(0, 1, 2))(q, k, v) for c in (8, t)])
  for got, want in zip(*grads(q, k, v)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def _dots(jaxpr) -> int:
  """dot_general equations in `jaxpr` and every jaxpr nested in it (scan, remat, ...)."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "dot_general"
    for p in eqn.params.values():
      for sub in p if isinstance(p, (list, tuple)) else (p,):
        sub = getattr(sub, "jaxpr", sub)
        n += _dots(sub) if hasattr(sub, "eqns") else 0
  return n


def test_training_keeps_no_seq_by_seq_scores():
  """At a paper-like length, the backward pass of a frozen trunk keeps no float `[seq, seq]` array,
  and "save_qkv_mlp" recomputes no projection (only the attention scores) where "full" recomputes all."""
  t = 2 * modeling.ATTENTION_CHUNK + 20
  cfg = _tiny("llama", max_position_embeddings=1024)
  dots = {}
  for remat in ("none", "save_qkv_mlp", "full"):
    model = modeling.Trunk(cfg, rngs=nnx.Rngs(0), remat=remat)
    loss = lambda e: jnp.sum(model.hidden_states(e))
    residuals = jax.eval_shape(lambda e: jax.tree.leaves(jax.vjp(loss, e)[1]), jnp.zeros((1, t, 32)))
    floats = [r for r in residuals if jnp.issubdtype(r.dtype, jnp.floating)]
    # 4 heads' scores over a third of the queries (one block) would already be 4 * t * t / 3.
    assert max(int(np.prod(r.shape)) for r in floats) < 4 * t * t // 3, (remat, [r.shape for r in floats])
    dots[remat] = _dots(jax.make_jaxpr(jax.grad(loss))(jnp.zeros((1, 9, 32))).jaxpr)
  assert dots["save_qkv_mlp"] <= dots["none"] + 2 < dots["full"], dots


def _train_step_memory(layers: int):
  """Compiled memory of a stage-1 train step of a wide, short-sequence f32 trunk
  (weights dwarf activations), from abstract shapes."""
  from persomux import prompts, train

  cfg = TrunkConfig.llama(vocab_size=512, d_model=256, num_layers=layers, num_heads=4, num_kv_heads=2,
                          ffn_dim=1024)
  trunk = nnx.eval_shape(lambda: modeling.Trunk(cfg, rngs=None, remat="full"))
  pm, opt = nnx.eval_shape(lambda: (lambda p: (p, nnx.Optimizer(
      p, train.make_tx(train.OptimConfig(), 10), wrt=prompts.PromptParam)))(
          prompts.PersonaMux(4, cfg.d_model, num_codes=4, code_tokens=2, bias_tokens=2, rngs=nnx.Rngs(0))))
  s = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt)
  batch = {"input_ids": s((2, 8), jnp.int32), "attention_mask": s((2, 8), jnp.int32),
           "loss_mask": s((2, 8), jnp.float32), "soft_index": s((2,), jnp.int32), "class_ids": s((2,), jnp.int32)}
  mem = train.train_step.lower(trunk, pm, opt, batch).compile().memory_analysis()
  layer_bytes = 4 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 1024 + 2 * 256)
  return mem, layer_bytes


def test_a_train_step_neither_copies_nor_stacks_the_frozen_weights():
  """The step returns only what it changed (not the trunk), and a layer's weights are sliced inside its
  rematerialized call, so the forward pass keeps no stacked copy of them for the backward one: each
  extra layer costs far less temporary memory than its weights."""
  m4, layer_bytes = _train_step_memory(4)
  m8, _ = _train_step_memory(8)
  assert m4.output_size_in_bytes < 0.05 * m4.argument_size_in_bytes
  assert (m8.argument_size_in_bytes - m4.argument_size_in_bytes) == pytest.approx(4 * layer_bytes, rel=0.01)
  assert (m8.temp_size_in_bytes - m4.temp_size_in_bytes) / 4 < 0.25 * layer_bytes
