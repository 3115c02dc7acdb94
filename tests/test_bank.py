"""Adding personas to a trained codebook (`stages.add_personas`) and the persona bank.

On the colour population of `tests/test_learning.py` (a persona always names
its colour, so with the persona known the colour costs nothing and without it
log 8 nats), after stage 1:

- a job of brand-new persona names learns them: held-out loss falls below
  the frozen trunk's, scored by transformers; 1 and 500 personas work too;
- W and b stay stage 1's; names that clash are refused and listed, unless
  `replace` (a job of one persona, which learns it); a killed job resumes to
  the uninterrupted result; a finished job reports; a changed one is refused;
- the bank gathers stage 1, the held-out personas and every job; its soft
  prompts are b ⊕ Σ m W by hand, and generation through it for a mix of
  personas in one batch equals each persona's own generation.
"""

import json
import os
import random

import numpy as np
import pytest

import persomux
from persomux import data as data_lib
from persomux import sampling, stages
from persomux.bank import PersonaBank
from tests.test_learning import COLOURS, FILLERS, hf_class_losses, stage1  # noqa: F401 (a fixture)


def new_records(names_colours, per_persona: int, seed: int):
  rng = random.Random(seed)
  return [data_lib.Record(name, f"{COLOURS[c]} {rng.choice(FILLERS)}")
          for name, c in names_colours for _ in range(per_persona)]


NEW = [(f"npc_{c}", c) for c in (0, 3, 5)]


@pytest.fixture(scope="module")
def job(stage1):  # noqa: F811
  s = stage1
  stages.save_run(s["cfg"], s["workdir"])  # as launch/pretrain.py does; the bank reads the trunk's size there
  records = new_records(NEW, 16, seed=7)
  out = stages.add_personas(s["cfg"], s["workdir"], s["trunk"], s["tok"], records, job="npcs", progress=False)
  return dict(s, job_records=records, job_out=out)


def test_new_personas_learn(job):
  s, out = job, job["job_out"]
  names = [n for n, _ in NEW]
  assert out["classes"] == names
  _, te = stages.make_examples(s["job_records"], names, s["fmt"], s["cfg"].to_dict(), "max_per_class_finetune",
                               __import__("collections").Counter())
  trunk_loss = hf_class_losses(s["model_dir"], te)
  for c, name in enumerate(names):
    r = out["per_persona"][name]
    assert (r["train_examples"], r["test_examples"]) == (12, 4)
    assert r["test_loss"] < trunk_loss[c] - 0.5, (name, r, trunk_loss[c])
    assert r["test_loss"] < r["initial_test_loss"] - 0.5
  d = s["trunk"].config.d_model
  base, _ = stages.load_prompt(s["workdir"], "pretrain", d)
  np.testing.assert_array_equal(np.asarray(out["prompt"].codebook[...]), np.asarray(base.codebook[...]))
  np.testing.assert_array_equal(np.asarray(out["prompt"].bias[...]), np.asarray(base.bias[...]))
  entry = json.load(open(os.path.join(s["workdir"], "personas", "npcs.json")))
  assert entry["status"] == "done" and entry["classes"] == names
  assert entry["result"]["per_persona"]["npc_0"]["test_loss"] == pytest.approx(out["per_persona"]["npc_0"]["test_loss"])


def test_five_hundred_personas(job):
  s = job
  many = [(f"crowd_{i:03d}", i % 8) for i in range(500)]
  # One reply each to learn from and one held out: 500 rows in the full batch.
  out = stages.add_personas(s["cfg"], s["workdir"], s["trunk"], s["tok"], new_records(many, 2, seed=4),
                            job="crowd", progress=False)
  assert len(out["per_persona"]) == 500
  assert all(r["train_examples"] == 1 and r["test_examples"] == 1 for r in out["per_persona"].values())
  assert out["test_loss"] < out["initial_test_loss"] - 0.5


def test_name_clashes_are_listed_unless_replace(job):
  s = job
  d = s["trunk"].config.d_model
  clash = new_records([(s["pre"][0], 1), ("npc_0", 2), ("fresh", 4)], 4, seed=5)
  with pytest.raises(stages.JobError) as e:
    stages.add_personas(s["cfg"], s["workdir"], s["trunk"], s["tok"], clash, job="clash", progress=False)
  msg = str(e.value)
  assert f"{s['pre'][0]!r} (stage 1)" in msg and "'npc_0' (job 'npcs')" in msg and "fresh" not in msg
  assert "--replace" in msg and not os.path.exists(os.path.join(s["workdir"], "personas", "clash.json"))
  # With replace, npc_0 now names colour 2 (a job of one persona, which it learns); the bank serves the new one.
  one = stages.add_personas(s["cfg"], s["workdir"], s["trunk"], s["tok"], new_records([("npc_0", 2)], 8, seed=6),
                            job="npc0v2", replace=True, progress=False)
  assert list(one["per_persona"]) == ["npc_0"] and one["test_loss"] < one["initial_test_loss"] - 0.5
  bank = PersonaBank.load(s["workdir"])
  assert bank["npc_0"].job == "npc0v2"
  module, cid, stage = stages.find_persona(s["workdir"], "npc_0", "persona_mux", d)
  assert stage == stages.job_stage("npc0v2") and cid == 0
  np.testing.assert_array_equal(bank["npc_0"].mixtures, np.asarray(module.mixtures[...])[0])


class Killed(Exception):
  pass


def test_killed_job_resumes_exactly_and_changes_are_refused(job):
  s = job
  cfg = s["cfg"].copy_and_resolve_references()
  cfg.finetune.checkpoint_every = 10
  # The fixture's job, uninterrupted, is the reference: the same data under new names.
  ref = s["job_out"]
  names = {n: f"k{n}" for n, _ in NEW}
  renamed = [data_lib.Record(names[r.cls], r.text) for r in s["job_records"]]

  def kill(step):
    if step == 25:
      raise Killed

  with pytest.raises(Killed):
    stages.add_personas(cfg, s["workdir"], s["trunk"], s["tok"], renamed, job="killed", progress=False,
                        on_step=kill)
  assert json.load(open(os.path.join(s["workdir"], "personas", "killed.json")))["status"] == "running"
  resumed = stages.add_personas(cfg, s["workdir"], s["trunk"], s["tok"], renamed, job="killed", progress=False)
  np.testing.assert_array_equal(np.asarray(resumed["prompt"].mixtures[...]), np.asarray(ref["prompt"].mixtures[...]))
  # Finished: a rerun reports without training; another config or data is refused.
  again = stages.add_personas(cfg, s["workdir"], s["trunk"], s["tok"], renamed, job="killed", progress=False)
  assert again["resumed"] == "done" and again["test_loss"] == pytest.approx(resumed["test_loss"])
  cfg.finetune.learning_rate = 0.5
  with pytest.raises(stages.JobError, match="different finetune"):
    stages.add_personas(cfg, s["workdir"], s["trunk"], s["tok"], renamed, job="killed", progress=False)
  with pytest.raises(stages.JobError, match="different data"):
    stages.add_personas(s["cfg"], s["workdir"], s["trunk"], s["tok"], renamed[:-1], job="killed", progress=False)


def test_bank_gathers_every_persona_and_batches_them(job):
  s = job
  d = s["trunk"].config.d_model
  stages.finetune(s["cfg"], s["workdir"], s["trunk"], s["tok"], s["records"], progress=False)
  bank = PersonaBank.load(s["workdir"])
  jobs = {p["name"]: p["job"] for p in bank.describe()}
  assert all(jobs[c] == "stage 1" for c in s["pre"]) and all(jobs[c] == "held-out" for c in s["fine"])
  assert jobs["npc_3"] == "npcs" and jobs["crowd_499"] == "crowd"
  # Soft prompts by hand: b (scaled; dropped at 0) then Σ_j m_j W_j.
  names, scales = ["npc_3", s["pre"][1], s["fine"][0]], [1.0, 0.5, 0.0]
  sp = bank.soft_prompts(names, scales)
  soft, soft_len = sp.module(np.asarray(sp.class_ids), np.asarray(scales, np.float32))
  for row, (name, scale) in enumerate(zip(names, scales)):
    codes = np.einsum("n,nkd->kd", bank[name].mixtures, bank.codebook)
    want = codes if scale == 0 else np.concatenate([scale * bank.bias, codes])
    assert int(soft_len[row]) == len(want)
    np.testing.assert_allclose(np.asarray(soft[row, :len(want)]), want, rtol=1e-6, atol=1e-6)
  # One mixed batch through the bank equals each persona generated alone from its own prompt state.
  prompts = ["", "", ""]
  mixed = persomux.generate(s["trunk"], s["tok"], prompts, max_new_tokens=3, soft_prompts=sp)
  for row, (name, scale) in enumerate(zip(names, scales)):
    module, cid, _ = stages.find_persona(s["workdir"], name, "persona_mux", d)
    alone = persomux.generate(s["trunk"], s["tok"], [""], max_new_tokens=3,
                              soft_prompts=sampling.SoftPrompts(module, [cid], scale))
    assert mixed[row] == alone[0]
  assert mixed[0].split()[0] == COLOURS[3]
  with pytest.raises(KeyError, match="not in the bank"):
    bank.soft_prompts(["nobody"])
  # Export and read back: the same personas, nothing unpickled.
  back = PersonaBank.read(bank.save(os.path.join(s["workdir"], "export")))
  assert back.names == bank.names and back.describe() == bank.describe()
  np.testing.assert_array_equal(back["crowd_007"].mixtures, bank["crowd_007"].mixtures)
  np.testing.assert_array_equal(back.codebook, bank.codebook)
