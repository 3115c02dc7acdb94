"""Training stages: freezing, warmup, resume after a kill, NaN handling."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

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


def test_evaluate_per_class_is_token_mean_of_that_class(trunk):
  pm = new_prompt()
  data = RandomBatches()
  batches = [data.batch(0, i) for i in range(3)]
  ev = train.evaluate(trunk, pm, batches)
  sums, counts = {}, {}
  for bt in batches:
    nll, mask = train.token_nll(trunk, pm, {k: jnp.asarray(v) for k, v in bt.items()})
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
