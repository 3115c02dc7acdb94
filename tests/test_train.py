"""Training stages: the target-only chunked loss, freezing, warmup, gradient accumulation, resume after a
kill, non-finite losses and gradients, and resumes with a changed config."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persomux import data as data_lib
from persomux import prompts, train
from persomux.checkpoint import Checkpointer
from persomux.models.config import TrunkConfig
from persomux.models.modeling import Trunk

NUM_CLASSES = 4


class RandomBatches:
  """Deterministic token batches keyed by (epoch, index)."""

  def __init__(self, steps=3, b=4, t=12, vocab=64, seed=0):
    self.steps, self.b, self.t, self.vocab, self.seed = steps, b, t, vocab, seed

  def steps_per_epoch(self):
    return self.steps

  def batch(self, epoch, index):
    r = np.random.RandomState(self.seed + 1000 * epoch + index)
    am = np.ones((self.b, self.t), np.int32)
    am[0, 9:] = 0
    lm = np.zeros((self.b, self.t), np.float32)
    lm[:, 5:] = am[:, 5:]
    return {"input_ids": r.randint(3, self.vocab, (self.b, self.t)).astype(np.int32), "attention_mask": am,
            "loss_mask": lm, "soft_index": r.randint(1, 4, (self.b,)).astype(np.int32),
            "class_ids": r.randint(0, NUM_CLASSES, (self.b,)).astype(np.int32)}

  def micro_batches(self, epoch, index):
    return [self.batch(epoch, index)]


@pytest.fixture(scope="module")
def trunk():
  cfg = TrunkConfig.llama(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64)
  return Trunk(cfg, rngs=nnx.Rngs(0))


def new_prompt(cls=prompts.PersonaMux):
  return cls(NUM_CLASSES, 32, num_codes=4, code_tokens=2, bias_tokens=3, rngs=nnx.Rngs(1))


def stage1_phases(data=None, warmup=3, joint=5):
  data = data or RandomBatches()
  o = train.OptimConfig(learning_rate=1e-2)
  return [train.Phase("warmup", prompts.Bias, data, warmup, o),
          train.Phase("joint", prompts.PromptParam, data, joint, o)]


def arrays(module):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module)))


def test_warmup_trains_only_bias_with_zero_mixtures(trunk):
  pm = new_prompt()
  before = arrays(pm)
  train.run_phases(trunk, pm, stage1_phases(joint=0)[:1], progress=False)
  after = arrays(pm)
  np.testing.assert_array_equal(after["codebook"], before["codebook"])
  np.testing.assert_array_equal(after["mixtures"], np.zeros_like(before["mixtures"]))
  assert np.abs(after["bias"] - before["bias"]).max() > 0


def test_joint_phase_trains_codebook_bias_and_mixtures_of_seen_classes(trunk):
  pm = new_prompt()
  trunk_before = arrays(trunk)
  train.run_phases(trunk, pm, stage1_phases(), progress=False)
  after = arrays(pm)
  assert np.abs(after["codebook"] - arrays(new_prompt())["codebook"]).max() > 0
  assert np.abs(after["mixtures"]).max() > 0
  for a, b in zip(jax.tree.leaves(trunk_before), jax.tree.leaves(arrays(trunk))):
    np.testing.assert_array_equal(a, b)  # the trunk is frozen


def test_stage2_trains_only_mixtures(trunk):
  pm = new_prompt()
  train.run_phases(trunk, pm, stage1_phases(), progress=False)
  before = arrays(pm)
  o = train.OptimConfig(learning_rate=1e-2)
  train.run_phases(trunk, pm, [train.Phase("finetune", prompts.Mixtures, RandomBatches(seed=7), 4, o)],
                   progress=False)
  after = arrays(pm)
  np.testing.assert_array_equal(after["codebook"], before["codebook"])
  np.testing.assert_array_equal(after["bias"], before["bias"])
  assert np.abs(after["mixtures"] - before["mixtures"]).max() > 0


def test_a_phase_compiles_its_step_once(trunk, caplog):
  """The optimizer's fresh counters are placed like the step's outputs, so step 2
  reuses step 1's executable (an 8B model compiles for minutes)."""
  o = train.OptimConfig(learning_rate=1e-2)
  data = RandomBatches(b=3, t=14, seed=11)  # shapes no other test compiles
  with caplog.at_level("WARNING"), jax.log_compiles(True):
    train.run_phases(trunk, new_prompt(), [train.Phase("finetune", prompts.Mixtures, data, 3, o)],
                     progress=False)
  compiles = [r for r in caplog.records if "Compiling jit(train_step)" in r.getMessage()]
  assert len(compiles) == 1, [r.getMessage()[:200] for r in compiles]


def test_random_codebook_never_moves(trunk):
  rc = new_prompt(prompts.RandomCodebook)
  before = arrays(rc)
  train.run_phases(trunk, rc, stage1_phases(), progress=False)
  np.testing.assert_array_equal(arrays(rc)["codebook"], before["codebook"])


class Killed(Exception):
  pass


@pytest.mark.parametrize("kill_at", [2, 5, 7])
def test_resume_after_kill_equals_uninterrupted(trunk, tmp_path, kill_at):
  ref = new_prompt()
  train.run_phases(trunk, ref, stage1_phases(), workdir=str(tmp_path / "ref"), checkpoint_every=2,
                   progress=False)

  def kill(step):
    if step == kill_at:
      raise Killed

  with pytest.raises(Killed):
    train.run_phases(trunk, new_prompt(), stage1_phases(), workdir=str(tmp_path / "run"), checkpoint_every=2,
                     progress=False, on_step=kill)
  resumed = new_prompt()
  train.run_phases(trunk, resumed, stage1_phases(), workdir=str(tmp_path / "run"), checkpoint_every=2,
                   progress=False)
  for a, b in zip(jax.tree.leaves(arrays(ref)), jax.tree.leaves(arrays(resumed))):
    np.testing.assert_array_equal(a, b)
  assert os.path.getsize(tmp_path / "run" / "metrics.jsonl") > 0


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = TrunkConfig.llama(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64)
  trunk = Trunk(cfg, rngs=nnx.Rngs(0))
  pm = new_prompt()

  def poison(step):
    if step == 5:  # the trunk goes bad; the checkpoint of step 5 is still written
      trunk.norm.weight[...] = jnp.full_like(trunk.norm.weight[...], jnp.nan)

  with pytest.raises(train.TrainingDiverged, match="loss is nan"):
    train.run_phases(trunk, pm, stage1_phases(), workdir=str(tmp_path), checkpoint_every=2, progress=False,
                     on_step=poison)
  ck = Checkpointer(str(tmp_path / "checkpoints" / "train"))
  assert ck.latest_step() == 5
  restored = new_prompt()
  meta = ck.restore({"prompt": restored, "opt": nnx.Optimizer(
      restored, train.make_tx(train.OptimConfig(), 5), wrt=prompts.PromptParam)})
  assert meta["phase_name"] == "joint" and meta["step"] == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(arrays(restored)))


def full_logits_nll(trunk, prompt, batch, bias_scale=1.0):
  """The loss as persomux computed it before target-only logits: `[batch, seq, vocab]` logits at every
  position of the spliced sequence, then the targets' negative log-likelihood `(nll, mask)` `[batch, seq]`."""
  ids = batch["input_ids"]
  b, t = ids.shape
  embeds = trunk.embed(ids)
  if prompt is None:
    h = trunk.hidden_states(embeds, batch["attention_mask"])
    token_index = jnp.broadcast_to(jnp.arange(t), (b, t))
  else:
    soft, soft_len = prompt(batch["class_ids"], bias_scale)
    embeds, mask, positions, token_index = prompts.splice(embeds, batch["attention_mask"], soft, soft_len,
                                                          batch["soft_index"])
    h = trunk.hidden_states(embeds, mask, positions)
  logits = trunk.logits(h)
  logits = jnp.take_along_axis(logits, jnp.maximum(token_index - 1, 0)[..., None], axis=1)
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0]
  mask = batch["loss_mask"] * (jnp.arange(t) > 0)[None, :]
  return nll * mask, mask


def ragged_batch(b=5, vocab=64, seed=3):
  """A collated batch (with its `targets`) of rows of different prompt and target lengths, one empty row."""
  r = np.random.RandomState(seed)
  ids = lambda n: r.randint(3, vocab, n).astype(np.int32)
  shapes = [(1, 6, 3), (3, 0, 9), (2, 4, 1), (2, 20, 4)]  # (prefix, suffix, target)
  exs = [data_lib.Example(ids(p), ids(s_), ids(t), i % NUM_CLASSES) for i, (p, s_, t) in enumerate(shapes)]
  return data_lib.collate(exs, b, (8, 16, 32))


# One chunk; several (each under remat); one target per row and chunk. With the batch's own `targets`
# (collate), or derived from the loss mask.
@pytest.mark.parametrize("loss_chunk,with_prompt,source", [
    (1024, True, "collate"), (7, True, "collate"), (1, False, "collate"), (7, True, "no_targets"),
    (7, False, "no_targets")])
def test_target_only_chunked_loss_equals_full_logits(trunk, loss_chunk, with_prompt, source):
  """Logits only at target positions, in chunks: the same loss and gradients as full logits."""
  batch = ragged_batch() if source == "collate" else RandomBatches().batch(0, 0)
  if source == "collate":
    assert batch["targets"].shape == (5, 16) and batch["targets"].shape[1] < batch["input_ids"].shape[1]
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  pm = new_prompt() if with_prompt else None
  if pm is not None:
    pm.mixtures[...] = jax.random.normal(jax.random.key(2), pm.mixtures.shape)

  def ours(t, p):
    return train.mean_loss(t, p, batch, 1.0, loss_chunk)

  def ref(t, p):
    nll, mask = full_logits_nll(t, p, batch)
    return nll.sum() / mask.sum()

  grad = lambda f, m: nnx.jit(nnx.value_and_grad(f))(m)
  if pm is None:  # gradients with respect to every trunk weight (the demo's base model trains them all)
    (a, ga), (b, gb) = (grad(f, trunk) for f in (lambda t: ours(t, None), lambda t: ref(t, None)))
  else:
    (a, ga), (b, gb) = (grad(f, pm) for f in (lambda p: ours(trunk, p), lambda p: ref(trunk, p)))
  np.testing.assert_allclose(float(a), float(b), rtol=1e-5, atol=1e-5)
  for x, y in zip(jax.tree.leaves(nnx.to_pure_dict(ga)), jax.tree.leaves(nnx.to_pure_dict(gb))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
  # Per row, as evaluation and scoring sum them.
  s, c = train.row_losses(trunk, pm, batch, jnp.float32(1.0), loss_chunk=loss_chunk)
  nll, mask = nnx.jit(full_logits_nll)(trunk, pm, batch)
  np.testing.assert_allclose(np.asarray(s), np.asarray(nll.sum(-1)), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(c), np.asarray(mask.sum(-1)))


def _head_test_trunk(family):
  """A tiny Llama, or a tiny Gemma 2 (tied head, soft-capped logits, (1 + w) final norm), whose head
  `[96, 32]` has a shape no other weight has."""
  import dataclasses

  if family == "llama":
    return Trunk(TrunkConfig.llama(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                   ffn_dim=64), rngs=nnx.Rngs(0))
  cfg = dataclasses.replace(TrunkConfig.gemma2_27b(), vocab_size=96, d_model=32, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=8, ffn_dim=64, layer_types=("sliding_attention", "full_attention"),
                            sliding_window=4, query_pre_attn_scalar=8)
  return Trunk(cfg, rngs=nnx.Rngs(0))


# What trains: soft prompts or LoRA adapters (the head frozen), or every weight of the trunk.
@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("trains", ["prompt", "lora", "trunk"])
def test_head_products_per_target_token(family, trains):
  """Differentiated over several chunks, the loss multiplies each target token by the head twice when
  the head is frozen (logits, and the gradient with respect to the hidden state, both in the forward
  pass) and four times when it trains (logits, logits recomputed, hidden-state and head gradients):
  hand-counted FLOPs of the gradient's products with the head. The gradients equal full logits'."""
  from launch.benchmark import matmul_flops
  from persomux.models import lora

  t = _head_test_trunk(family)
  batch = {k: jnp.asarray(v) for k, v in ragged_batch().items()}  # 5 rows x 16 target slots
  pm = new_prompt() if trains == "prompt" else None
  if trains == "lora":
    lora.attach(t, lora.LoRAConfig(rank=2, targets=("q_proj", "v_proj")), seed=1)
    for _, _, a in lora.adapters(t):
      a.b[...] = 0.1 * jnp.ones_like(a.b[...])
  try:
    owner, wrt = ((pm, prompts.PromptParam) if trains == "prompt" else
                  (t, lora.LoRAParam) if trains == "lora" else (t, nnx.Param))

    def loss(fn):
      def f(o):
        tt, p = (t, o) if trains == "prompt" else (o, None)
        return fn(tt, p)
      return lambda o: nnx.grad(f, argnums=nnx.DiffState(0, wrt))(o)

    ours = loss(lambda tt, p: train.mean_loss(tt, p, batch, 1.0, 20))  # 4 target slots per row and chunk
    ref = loss(lambda tt, p: (lambda nll, m: nll.sum() / m.sum())(*full_logits_nll(tt, p, batch)))
    v, d = t.config.vocab_size, t.config.d_model
    head = lambda *shapes: (v, d) in shapes
    flops = matmul_flops(jax.make_jaxpr(ours)(owner).jaxpr, head)
    per_product = 2 * 5 * 16 * v * d
    assert flops == (4 if trains == "trunk" else 2) * per_product, (flops, per_product)
    ga, gb = nnx.jit(ours)(owner), nnx.jit(ref)(owner)
    for x, y in zip(jax.tree.leaves(nnx.to_pure_dict(ga)), jax.tree.leaves(nnx.to_pure_dict(gb))):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
  finally:
    if trains == "lora":
      lora.detach(t)


def test_the_loss_never_forms_batch_seq_vocab_logits():
  """The compiled loss and gradient need far less than `[batch, seq, vocab]` float32 logits, and far
  less than all targets' logits at once: with `loss_chunk`, one chunk of logits exists at a time."""
  vocab = 4096  # logits dominate every other array
  cfg = TrunkConfig.llama(vocab_size=vocab, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, ffn_dim=32)
  big = Trunk(cfg, rngs=nnx.Rngs(0))
  pm = prompts.PersonaMux(NUM_CLASSES, 16, num_codes=4, code_tokens=2, bias_tokens=3, rngs=nnx.Rngs(1))
  batch = {k: jnp.asarray(v) for k, v in RandomBatches(b=8, t=64, vocab=vocab).batch(0, 0).items()}
  full = 8 * 64 * vocab * 4
  grad = lambda chunk: nnx.jit(lambda p: nnx.grad(lambda q: train.mean_loss(big, q, batch, 1.0, chunk))(p))
  temp = {chunk: grad(chunk).lower(pm).compile().memory_analysis().temp_size_in_bytes for chunk in (64, 512)}
  # 59 targets a row: 8 chunks of 8 per row at loss_chunk 64, against all 472 targets' logits at once at 512.
  assert temp[64] < full / 2 and temp[64] < temp[512] / 3, (temp, full)


def test_evaluate_per_class_is_token_mean_of_that_class(trunk):
  pm = new_prompt()
  data = RandomBatches()
  batches = [data.batch(0, i) for i in range(3)]
  ev = train.evaluate(trunk, pm, batches)
  sums, counts = {}, {}
  for bt in batches:
    nll, mask = full_logits_nll(trunk, pm, {k: jnp.asarray(v) for k, v in bt.items()})
    for r, c in enumerate(bt["class_ids"]):
      sums[int(c)] = sums.get(int(c), 0.0) + float(nll[r].sum())
      counts[int(c)] = counts.get(int(c), 0.0) + float(mask[r].sum())
  for c in sums:
    assert ev["per_class"][c] == pytest.approx(sums[c] / counts[c], rel=1e-5)
  assert ev["loss"] == pytest.approx(sum(sums.values()) / sum(counts.values()), rel=1e-5)


def test_remat_gives_the_same_loss_and_gradients(trunk):
  remat = Trunk(trunk.config, rngs=nnx.Rngs(0), remat=True)
  nnx.update(remat, nnx.state(trunk))
  pm = new_prompt()
  batch = {k: jnp.asarray(v) for k, v in RandomBatches().batch(0, 0).items()}
  grad = lambda t: nnx.value_and_grad(lambda p: train.mean_loss(t, p, batch))(pm)
  (l1, g1), (l2, g2) = grad(trunk), grad(remat)
  assert float(l1) == pytest.approx(float(l2), rel=1e-6)
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(g1)), jax.tree.leaves(nnx.to_pure_dict(g2))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)



def test_mixture_lr_scale_multiplies_only_the_mixtures_step():
  """Adam's first step is lr * sign(g) for every parameter; the mixtures' is scaled (hand computation)."""
  pm = prompts.PersonaMux(NUM_CLASSES, 8, num_codes=3, code_tokens=2, bias_tokens=2, rngs=nnx.Rngs(0))
  tx = train.make_tx(train.OptimConfig(learning_rate=1e-2, mixture_lr_scale=10.0, clip_norm=None), 10)
  opt = nnx.Optimizer(pm, tx, wrt=prompts.PromptParam)
  before = arrays(pm)
  opt.update(pm, jax.tree.map(jnp.ones_like, nnx.state(pm, prompts.PromptParam)))
  after = arrays(pm)
  for name, step in (("mixtures", 0.1), ("codebook", 0.01), ("bias", 0.01)):
    np.testing.assert_allclose(before[name] - after[name], step, rtol=1e-3)


# --- gradient accumulation ---------------------------------------------------------------------


def varied_examples(n=22, vocab=64, seed=5):
  """Examples of varied prompt and target lengths, so micro-batches differ in shape."""
  r = np.random.RandomState(seed)
  ids = lambda k: r.randint(3, vocab, k).astype(np.int32)
  return [data_lib.Example(ids(1 + r.randint(3)), ids(r.randint(14)), ids(1 + r.randint(10)), i % NUM_CLASSES)
          for i in range(n)]


def accumulation_phase(micro, steps=4, batch=10, n=20, buckets=(32,)):
  """Updates of `batch` examples as micro-batches of `micro` rows; one bucket (one compiled shape) unless
  `buckets` says otherwise."""
  src = data_lib.ShuffledBatches(varied_examples(n), batch, seed=0, buckets=buckets, micro_batch_size=micro)
  return [train.Phase("joint", prompts.PromptParam, src, steps, train.OptimConfig(learning_rate=1e-2))]


def test_accumulated_update_equals_one_big_batch(trunk):
  """Micro-batches of 4 rows (by decreasing length, each padded to its own bucket) give the update of
  the whole 10-row batch: the gradient of the mean over all of its target tokens."""
  phase = lambda micro: accumulation_phase(micro, steps=3, n=22, buckets=(16, 32))  # 10, 10 and 2 rows
  src = phase(4)[0].data
  micro = src.micro_batches(0, 0)
  whole = src.batch(0, 0)
  assert [b["input_ids"].shape[0] for b in micro] == [4, 4, 4]
  assert micro[0]["input_ids"].shape[1] > micro[-1]["input_ids"].shape[1]  # trimmed to their own buckets
  assert sum(b["loss_mask"].sum() for b in micro) == whole["loss_mask"].sum()
  # The micro-batches' token-weighted mean is the big batch's loss; a mean of their means is not.
  pm = new_prompt()
  pm.mixtures[...] = jax.random.normal(jax.random.key(2), pm.mixtures.shape)
  sums = [nnx.jit(train.loss_sums)(trunk, pm, b) for b in micro]
  big = float(nnx.jit(train.mean_loss)(trunk, pm, whole))
  assert sum(float(s) for s, _ in sums) / sum(float(n) for _, n in sums) == pytest.approx(big, rel=1e-6)
  assert abs(np.mean([float(s) / float(n) for s, n in sums]) - big) > 1e-3

  one, acc = new_prompt(), new_prompt()
  train.run_phases(trunk, one, phase(0), progress=False)
  train.run_phases(trunk, acc, phase(4), progress=False)
  start = arrays(new_prompt())
  for name in ("codebook", "bias", "mixtures"):
    assert np.abs(arrays(one)[name] - start[name]).max() > 1e-3
    np.testing.assert_allclose(arrays(acc)[name], arrays(one)[name], atol=1e-5, err_msg=name)


@pytest.mark.parametrize("kill", ["between_micro_batches", "between_updates"])
def test_resume_mid_accumulation_is_exact(trunk, tmp_path, kill):
  ref = new_prompt()
  train.run_phases(trunk, ref, accumulation_phase(4), workdir=str(tmp_path / "ref"), checkpoint_every=2,
                   progress=False)

  def micro_hook(step, index):  # update 4 (of 3 micro-batches; checkpointed after 2) dies after its second
    if kill == "between_micro_batches" and (step, index) == (4, 1):
      raise Killed

  def step_hook(step):
    if kill == "between_updates" and step == 3:
      raise Killed

  with pytest.raises(Killed):
    train.run_phases(trunk, new_prompt(), accumulation_phase(4), workdir=str(tmp_path / "run"), checkpoint_every=2,
                     progress=False, on_step=step_hook, on_micro_batch=micro_hook)
  resumed = new_prompt()
  train.run_phases(trunk, resumed, accumulation_phase(4), workdir=str(tmp_path / "run"), checkpoint_every=2,
                   progress=False)
  for a, b in zip(jax.tree.leaves(arrays(ref)), jax.tree.leaves(arrays(resumed))):
    np.testing.assert_array_equal(a, b)


def test_accumulation_compiles_its_steps_once(trunk, caplog):
  """Fresh accumulators are placed like the sums they add to, so every micro-batch and update after the
  first reuses the first's executables."""
  phase = accumulation_phase(5, steps=4, batch=15, n=30, buckets=(40,))  # shapes no other test compiles
  with caplog.at_level("WARNING"), jax.log_compiles(True):
    train.run_phases(trunk, new_prompt(), phase, progress=False)
  msgs = [r.getMessage() for r in caplog.records]
  counts = {f: sum(f"Compiling jit({f})" in m for m in msgs) for f in ("accumulate_step", "apply_step")}
  assert counts == {"accumulate_step": 1, "apply_step": 1}, counts


# --- non-finite gradients, changed configs --------------------------------------------------------


class SqrtPrompt(prompts.SoftPrompt):
  """Soft tokens sqrt(p): finite at p = 0, where the gradient is infinite."""

  def __call__(self, class_ids, bias_scale=1.0):
    soft, n = super().__call__(class_ids, bias_scale)
    return jnp.sqrt(soft), n


@pytest.mark.parametrize("micro", [0, 4])
def test_non_finite_gradient_stops_and_keeps_last_good_checkpoint(trunk, tmp_path, micro):
  pm = SqrtPrompt(NUM_CLASSES, 32, num_tokens=2, rngs=nnx.Rngs(1))
  pm.prompts[...] = jnp.abs(pm.prompts[...]) + 0.1

  def poison(step):
    if step == 3:  # after the checkpoint of step 2: every entry at 0 makes step 4's gradient infinite
      pm.prompts[...] = jnp.zeros_like(pm.prompts[...])

  phase = accumulation_phase(micro)[0]
  phase = train.Phase("finetune", prompts.ClassPrompts, phase.data, 4, phase.optim)
  with pytest.raises(train.TrainingDiverged, match=r"gradient norm is (inf|nan) \(loss \d"):
    train.run_phases(trunk, pm, [phase], workdir=str(tmp_path), checkpoint_every=2, progress=False,
                     on_step=poison)
  ck = Checkpointer(str(tmp_path / "checkpoints" / "train"))
  assert ck.latest_step() == 2
  restored = SqrtPrompt(NUM_CLASSES, 32, num_tokens=2, rngs=nnx.Rngs(1))
  ck.restore({"prompt": restored, "opt": nnx.Optimizer(
      restored, train.make_tx(train.OptimConfig(), 4), wrt=prompts.ClassPrompts)})
  assert np.all(np.asarray(restored.prompts[...]) > 0)  # the state before the poison


def test_resume_with_a_changed_config_is_refused_unless_allowed(trunk, tmp_path):
  run = lambda config, **kw: train.run_phases(trunk, new_prompt(), stage1_phases(), workdir=str(tmp_path),
                                              checkpoint_every=2, progress=False, config=config, **kw)

  def kill(step):
    if step == 3:
      raise Killed

  config = {"pretrain.learning_rate": 0.01, "data.path": "a.jsonl", "pretrain.micro_batch_size": 0}
  with pytest.raises(Killed):
    run(config, on_step=kill)
  changed = {**config, "pretrain.learning_rate": 0.1, "data.path": "b.jsonl", "pretrain.micro_batch_size": 2}
  with pytest.raises(train.ConfigChanged, match=r"changed: data\.path: 'a\.jsonl' -> 'b\.jsonl'; "
                     r"pretrain\.learning_rate: 0\.01 -> 0\.1\. .*--allow_config_change") as e:
    run(changed)
  assert "micro_batch_size" not in str(e.value)  # memory-only fields may change
  run({**config, "pretrain.micro_batch_size": 2})
  out = run(changed, allow_config_change=True)
  assert out["steps"] == 8


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_accumulation_on_a_mesh_equals_one_device():
  from persomux import sharding

  mesh = sharding.parse_mesh("data:2,fsdp:2,tensor:2")
  cfg = TrunkConfig.llama(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64)
  one, spread = Trunk(cfg, rngs=nnx.Rngs(0)), Trunk(cfg, rngs=nnx.Rngs(0))
  sharding.shard_module(spread, mesh, sharding.trunk_spec)
  p1, p8 = new_prompt(), new_prompt()
  train.run_phases(one, p1, accumulation_phase(4, steps=2), progress=False)
  train.run_phases(spread, p8, accumulation_phase(4, steps=2), progress=False, mesh=mesh)
  assert len(p8.mixtures[...].sharding.device_set) == 8
  for a, b in zip(jax.tree.leaves(arrays(p1)), jax.tree.leaves(arrays(p8))):
    np.testing.assert_allclose(a, b, atol=1e-5)
