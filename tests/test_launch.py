"""End to end through the absl launches: pretrain -> finetune -> generate on a tiny trunk."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from persomux import synthetic
from persomux.tokenizer import train_bpe_tokenizer
from tests.conftest import CACHE_ENV, FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Overrides for every tiny run these tests start: checkpoints and evals at the end of each phase only (the
# tiny config's every-2/every-4 cadence costs more than the steps; what is checked is the end of a phase).
QUIET = [f"--config.{stage}.{field}=1000" for stage in ("pretrain", "finetune", "lora")
         for field in ("checkpoint_every", "eval_every")]


def launch_env(xla_flags="", **extra):
  """The environment of a launch subprocess: one device unless `xla_flags` asks for more."""
  return dict(os.environ, XLA_FLAGS=f"{FAST_COMPILE} {xla_flags}".strip(), **extra)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("launch")
  records = synthetic.make_corpus(synthetic.SyntheticCorpusConfig(num_personas=12, examples_per_persona=8))
  data = tmp / "records.jsonl"
  synthetic.write_jsonl(records, data)
  tok = train_bpe_tokenizer(synthetic.population_text(records), vocab_size=300)
  torch.manual_seed(0)
  hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
  model_dir = tmp / "trunk"
  hf.save_pretrained(model_dir)
  tok.save_pretrained(model_dir)
  return tmp, str(model_dir), str(data), records


def cached_env(xla_flags="", **extra):
  """`launch_env` with the session's compilation cache (each launch loads the trunk and builds its prompts,
  so most small programs repeat)."""
  return launch_env(xla_flags, **{**CACHE_ENV, **extra})


def run(script, *args, check=True, env_extra=None):
  env_extra = dict(env_extra or {})
  env = cached_env(env_extra.pop("XLA_FLAGS", ""), **env_extra)
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


def test_pretrain_finetune_generate(setup):
  tmp, model_dir, data, records = setup
  workdir = str(tmp / "run")
  common = [f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}", f"--config.model_dir={model_dir}",
            f"--config.data.path={data}", "--config.data.finetune_fraction=0.25", *QUIET]
  out = run("pretrain.py", *common)
  assert "trainable parameters" in out.stdout
  # Rerun with another learning rate: refused before anything loads, naming the field.
  changed = run("pretrain.py", *common, "--config.pretrain.learning_rate=0.5", check=False)
  assert changed.returncode != 0 and "pretrain.learning_rate: 0.01 -> 0.5" in changed.stderr
  assert "--allow_config_change" in changed.stderr
  split = json.load(open(os.path.join(workdir, "split.json")))
  assert split["pretrain"] and split["finetune"] and not set(split["pretrain"]) & set(split["finetune"])
  run("finetune.py", f"--workdir={workdir}")
  metrics = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert {m["stage"] for m in metrics} == {"pretrain", "finetune_persona_mux"}
  assert any(m["event"] == "eval" and set(m["per_class"]) <= set(split["finetune"]) | set(split["pretrain"])
             and m["per_class"] for m in metrics)
  persona = split["finetune"][0]
  prompts = tmp / "prompts.txt"
  prompts.write_text("Tell me about the harbor.\nWhat do you think of the market?\n")
  run("generate.py", f"--workdir={workdir}", f"--persona={persona}", f"--prompts={prompts}",
            "--bias_scale=0.5", "--max_new_tokens=8", f"--output={tmp / 'out.jsonl'}")
  rows = [json.loads(l) for l in open(tmp / "out.jsonl")]
  assert [r["prompt"] for r in rows] == ["Tell me about the harbor.", "What do you think of the market?"]
  assert all(r["persona"] == persona and isinstance(r["generation"], str) for r in rows)
  bad = run("generate.py", f"--workdir={workdir}", "--persona=nobody", f"--prompts={prompts}", check=False)
  assert bad.returncode != 0 and "nobody" in bad.stderr
  # Drift: weights from two pairs (the trunk is its own small LM); they steer an added persona below.
  pairs = tmp / "pairs.jsonl"
  pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in [
      ("Tell me about the harbor.", "The harbor is calm.", "harbor!!"), ("Any plans?", "The market.", "nah")]))
  run("drift.py", "fit", f"--pairs={pairs}", f"--model={model_dir}", f"--out={tmp / 'drift.json'}", "--k=2")
  assert len(json.load(open(tmp / "drift.json"))["weights"]) == 2

  # Two brand-new personas join the trained codebook; then the bank exports every persona.
  new = [dict(r, **{"class": "newcomer_" + r["class"][-2:]}) for r in
         synthetic.make_corpus(synthetic.SyntheticCorpusConfig(num_personas=2, examples_per_persona=8, seed=5))]
  synthetic.write_jsonl(new, tmp / "new.jsonl")
  out = run("add_personas.py", f"--workdir={workdir}", f"--data={tmp / 'new.jsonl'}")
  last = json.loads(out.stdout.strip().splitlines()[-1])
  assert last["job"] == "new" and last["personas"] == 2 and last["test_loss"] < last["initial_test_loss"]
  assert "newcomer_00" in out.stdout and "loss before" in out.stdout
  again = run("add_personas.py", f"--workdir={workdir}", f"--data={tmp / 'new.jsonl'}")
  assert json.loads(again.stdout.strip().splitlines()[-1])["resumed"] == "done"
  clash = run("add_personas.py", f"--workdir={workdir}", f"--data={tmp / 'new.jsonl'}", "--job=other", check=False)
  assert clash.returncode != 0 and "'newcomer_00' (job 'new')" in clash.stderr and "--replace" in clash.stderr
  # An added persona answers, steered by the Drift weights (one launch checks both).
  run("generate.py", f"--workdir={workdir}", "--persona=newcomer_01", f"--prompts={prompts}", "--max_new_tokens=8",
      f"--drift={tmp / 'drift.json'}", f"--output={tmp / 'new_out.jsonl'}")
  new_rows = [json.loads(l) for l in open(tmp / "new_out.jsonl")]
  assert len(new_rows) == 2 and all(r["persona"] == "newcomer_01" for r in new_rows)
  run("export.py", f"--workdir={workdir}", "--format=safetensors", f"--out={tmp / 'bank'}")
  from persomux.bank import PersonaBank
  bank = PersonaBank.read(str(tmp / "bank" / "persona_mux.safetensors"))
  assert set(bank.names) == set(split["pretrain"]) | set(split["finetune"]) | {"newcomer_00", "newcomer_01"}
  assert bank["newcomer_00"].job == "new" and bank[split["finetune"][0]].job == "held-out"


def test_pretrain_on_a_simulated_mesh(setup):
  tmp, model_dir, data, _ = setup
  workdir = tmp / "sharded"
  run("pretrain.py", f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}", f"--config.model_dir={model_dir}",
      f"--config.data.path={data}", "--config.data.finetune_fraction=0.25", "--config.pretrain.epochs=0", *QUIET,
      "--mesh=data:2,fsdp:2,tensor:2", env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert (workdir / "prompt" / "pretrain").is_dir()


def test_help_is_clear():
  for script in ("pretrain.py", "finetune.py", "add_personas.py", "serve.py", "drift.py", "benchmark_preferences.py", "evaluate.py", "generate.py", "export.py", "demo.py", "benchmark.py"):
    out = run(script, "--helpshort", check=False)
    assert any(f in out.stdout for f in ("--workdir", "--suite", "--pairs", "--out")), script


def test_two_processes_train_like_one(setup):
  """Multi-host on one machine: 2 processes x 2 CPU devices equal 1 process x 4."""
  import socket

  import numpy as np

  from persomux import stages

  tmp, model_dir, data, _ = setup
  common = [f"--config={ROOT}/configs/tiny.py", f"--config.model_dir={model_dir}", f"--config.data.path={data}",
            "--config.data.finetune_fraction=0.25", "--config.data.max_per_class_pretrain=4",  # 7 steps a phase
            "--config.pretrain.epochs=1", "--mesh=data:4", *QUIET]
  run("pretrain.py", *common, f"--workdir={tmp / 'one'}",
      env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = launch_env("--xla_force_host_platform_device_count=2", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2")
  procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), *common,
                             f"--workdir={tmp / 'two'}", "--distributed"],
                            env=dict(env, JAX_PROCESS_ID=str(i)), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  one, _ = stages.load_prompt(str(tmp / "one"), "pretrain", 32)
  two, _ = stages.load_prompt(str(tmp / "two"), "pretrain", 32)
  for name in ("codebook", "bias", "mixtures"):
    np.testing.assert_allclose(np.asarray(getattr(two, name)[...]), np.asarray(getattr(one, name)[...]),
                               atol=1e-5, err_msg=name)
  metrics = [l for l in open(tmp / "two" / "metrics.jsonl")]
  steps = [json.loads(l)["step"] for l in metrics if '"train"' in l]
  assert steps == sorted(set(steps))  # written by process 0 only


def test_installed_package_runs_from_anywhere(tmp_path):
  """A non-editable install ships configs and launch beside persomux: they import, the launches run as
  `python -m launch.NAME` from any directory, and pip writes the persomux-* console scripts."""
  import importlib.util
  import shutil

  if importlib.util.find_spec("pip") is None or importlib.util.find_spec("setuptools") is None:
    pytest.skip("needs pip and setuptools to build without isolation")
  # Build from a copy, so pip's build/ and persomux.egg-info land in tmp_path, not in the checkout.
  src, target = tmp_path / "src", tmp_path / "target"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, name), src / name)
  for name in ("persomux", "configs", "launch"):
    shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
  pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(src)], capture_output=True, text=True,
                       timeout=180)
  assert pip.returncode == 0, pip.stderr[-3000:]
  assert (target / "bin" / "persomux-pretrain").is_file()

  env = dict(os.environ, PYTHONPATH=str(target))  # the installed copy only; cwd is not the checkout
  env.pop("XLA_FLAGS", None)

  def python(*args):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0 or "--helpshort" in args, proc.stderr[-3000:]  # absl's help exits 1
    return proc

  out = python("-c", "import configs.tiny, launch.serve; print(configs.tiny.__file__); print(launch.serve.__file__)")
  assert all(line.startswith(str(target)) for line in out.stdout.split()), out.stdout
  # The demo's --config default (launch/../configs/demo.py) resolves in the installed layout.
  out = python("-c", "from absl import flags; import launch.demo; flags.FLAGS(['demo', '--workdir=w']); "
               "print(flags.FLAGS.config.model_dir)")
  assert out.stdout.strip() == "smollm2-135m-instruct", out.stdout
  assert "--workdir" in python("-m", "launch.pretrain", "--helpshort").stdout


FLOP_COUNT = """
import jax, jax.numpy as jnp
from flax import nnx
from launch import benchmark
from persomux.models.modeling import Trunk, TrunkConfig

cfg = TrunkConfig.llama(vocab_size=64, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, ffn_dim=64)
trunk = Trunk(cfg, rngs=nnx.Rngs(0))
ids = jnp.ones((2, 8), jnp.int32)
print(benchmark.step_matmul_flops(lambda t, x: (t(x),), (trunk,), ids))
"""


def test_benchmark_counts_the_matmuls_of_every_scanned_layer():
  """The train suite's "fraction of peak" divides matmul FLOPs counted from the step's jaxpr. XLA's
  cost analysis counts a scan's body once (about one layer of the scanned trunk); the count must be
  the hand one: 3 layers x 16 tokens x 2 x (q 32x32 + k, v 32x16 + o 32x32 + gate, up, down 32x64),
  plus scores and values over 8 x 8 positions for 4 heads of 8 in 2 rows, plus the 32 -> 64 head."""
  proc = subprocess.run([sys.executable, "-c", FLOP_COUNT], capture_output=True, text=True, cwd=ROOT,
                        env=launch_env(), timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  layers = 3 * 16 * 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64)
  attention = 3 * 2 * 2 * 4 * (2 * 8 * 8 * 8)  # layers x (scores, values) x rows x heads x 2 q k head_dim
  head = 16 * 2 * 32 * 64
  assert float(proc.stdout.split()[-1]) == layers + attention + head


@pytest.mark.parametrize("block", [0, 8])
def test_scale_suite_places_decode_caches_as_the_prefill_does(monkeypatch, block):
  """The scale suite compiles decode from an abstract carry it places itself. Every KV cache must
  shard its kv heads over `tensor` as the library's prefill shards them, in either key layout: with
  keys in blocks (6 axes, the CPU default) a placement that matched 5-axis caches only left the
  keys replicated, and case (d)'s CPU compile read 34.86 GiB per device instead of 17.74."""
  import functools

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from launch import benchmark
  from persomux import sampling, sharding
  from persomux.models.modeling import Trunk, TrunkConfig

  monkeypatch.setattr(sampling, "KEY_BLOCK", block)
  cfg = TrunkConfig.llama(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4, ffn_dim=64)
  mesh = sharding.parse_mesh("tensor:4", devices=jax.devices()[:4])
  graphdef, state = nnx.split(Trunk(cfg, rngs=nnx.Rngs(0)))
  rows, prompt = 4, 56 + block  # a prompt length of its own: `_prefill` is jitted, read KEY_BLOCK when traced
  carry = jax.eval_shape(functools.partial(sampling._prefill, graphdef, max_new=8), state,
                         jax.ShapeDtypeStruct((rows, prompt, 32), jnp.float32),
                         jax.ShapeDtypeStruct((rows, prompt), jnp.int32), jax.random.key(0))
  placed = benchmark.decode_carry_placed(carry, mesh, rows)
  caches = [c for group in placed["caches"]["layers"] for c in group]
  assert caches and {len(c["k"].shape) for c in caches} == {6 if block else 5}
  for c in caches:
    for x in (c["k"], c["v"]):
      assert x.sharding.spec[2] == "tensor", (x.shape, x.sharding.spec)
      assert x.sharding.shard_shape(x.shape)[2] == 1  # 4 kv heads over 4 devices
  for x in jax.tree.leaves(placed["caches"]["pos"]):  # [rows, slots]: rows over the batch axes
    assert x.sharding.spec[0] == sharding.BATCH_AXES, x.sharding.spec
