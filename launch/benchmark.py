r"""Benchmarks persomux against its PyTorch peer in the same process.

  python launch/benchmark.py --suite=train

`lora`: the LoRA baseline's train step (rank 8 on q_proj and v_proj) on the
same model and batch against PEFT LoRA in PyTorch.

`serve`: a bounded load test of the persona server (launch/serve.py's app,
on 127.0.0.1): --clients concurrent clients, each with its own persona,
against the same requests served one at a time by a one-slot server, both in
this process on the benchmark model. Its last line is the throughput ratio.

`train`: the stage-1 (joint) Persona-Mux train step on a small Llama
(hidden 512, 8 layers, 8 heads, 4 kv heads, ffn 1376, vocab 32000), batch
8 x 128 tokens, fp32, against HF PEFT prompt tuning (20 virtual tokens =
l + k = 12 + 8, Adam) on the identical model in PyTorch. It prints tokens/s
of both at each side's fastest step (and the median), their ratio, and
achieved matmul FLOP/s (counted from the step's jaxpr) as a fraction of this
machine's fp32 matmul rate, measured in the same run. Absolute times on
shared machines are noise; the ratio is the figure.
"""

from __future__ import annotations

import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # python launch/benchmark.py from a checkout: persomux from the repo root
  sys.path.insert(0, _ROOT)

from absl import app, flags

FLAGS = flags.FLAGS
SCALE_CASES = ("llama3_8b_stage1", "gemma2_27b_stage1_fsdp8", "llama3_8b_stage2_full", "llama3_8b_decode_tp8")
flags.DEFINE_enum("suite", "train", ["train", "lora", "generate", "scale", "serve"], "Which benchmark to run.")
flags.DEFINE_integer("clients", 32, "serve suite: concurrent clients, each with its own persona.")
flags.DEFINE_integer("serve_tokens", 64, "serve suite: tokens each client asks for.")
flags.DEFINE_list("scale_cases", list(SCALE_CASES), "scale suite: which cases to compile.")
flags.DEFINE_string("scale_topology", "", "scale suite: compile for this TPU topology, deviceless (e.g. v5p:2x2x2; "
                    "needs libtpu, no TPU), instead of 8 simulated CPU devices, whose bfloat16 handling adds "
                    "float32 copies of the stacked weights.")
flags.DEFINE_integer("steps", 5, "Timed steps per side (after warmup).")
flags.DEFINE_integer("warmup", 2, "Untimed warmup steps per side.")
flags.DEFINE_integer("batch", 8, "Rows per batch.")
flags.DEFINE_integer("seq", 128, "Tokens per row.")
flags.DEFINE_integer("layers", 8, "Decoder layers of the benchmark model.")
flags.DEFINE_integer("seed", 0, "Seed for weights and tokens.")
flags.DEFINE_string("mesh", None, "train/generate suites: shard persomux over this mesh, e.g. data:2,tensor:2.")


def _mesh():
  from persomux import sharding

  return sharding.parse_mesh(FLAGS.mesh) if FLAGS.mesh else None


def benchmark_config(layers: int):
  from persomux.models.config import TrunkConfig

  return TrunkConfig.llama(vocab_size=32000, d_model=512, num_layers=layers, num_heads=8, num_kv_heads=4,
                           ffn_dim=1376, tie_embeddings=False, max_position_embeddings=2048)


def _times(fn, steps: int, warmup: int) -> list[float]:
  """Seconds of `steps` calls of `fn` after `warmup` untimed ones, fastest first."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return sorted(times)


def _fastest(fn, steps: int, warmup: int) -> tuple[float, float]:
  """(fastest, median) seconds of `steps` calls of `fn` after `warmup`. The train and lora suites
  compare the fastest: interference on a shared host only slows a step, and with glibc's blocks on
  huge pages the PyTorch peer's steps alternate between two speeds (about 0.9 and 1.4 s on a
  2-core Sapphire Rapids host), so either side's median falls on one or the other."""
  times = _times(fn, steps, warmup)
  return times[0], times[len(times) // 2]


def _median_time(fn, steps: int, warmup: int) -> float:
  times = _times(fn, steps, warmup)
  return times[len(times) // 2]


def matmul_flops_per_s(n: int = 2048, reps: int = 5) -> float:
  """This machine's fp32 matmul rate through XLA (the peak persomux can reach)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = _median_time(lambda: f(a).block_until_ready(), reps, 1)
  return 2 * n ** 3 / t


def matmul_flops(jaxpr, where=None) -> float:
  """The matmul FLOPs of a jaxpr: 2 x output size x contracted size of every `dot_general`
  (only those `where(*shapes)` holds for, if given: the operands' shapes, then the output's),
  inside nested jaxprs too, a scan's body once per iteration. XLA's `cost_analysis` counts a
  while loop's body once, so on the scanned trunk it reports about one layer's work."""
  import math

  from jax.extend import core

  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and (
        where is None or where(*(v.aval.shape for v in (*eqn.invars, *eqn.outvars)))):
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
    times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, (core.ClosedJaxpr, core.Jaxpr)):
          total += times * matmul_flops(getattr(sub, "jaxpr", sub), where)
  return total


def step_matmul_flops(step, modules: tuple, batch) -> float:
  """`matmul_flops` of `step(*modules, batch)` (an `nnx.jit` step), traced on merged copies of the
  modules so the originals never see a tracer."""
  import jax
  from flax import nnx

  graphdef, state = nnx.split(modules)
  return matmul_flops(jax.make_jaxpr(lambda s, x: step(*nnx.merge(graphdef, s), x)[0])(state, batch).jaxpr)


def train_suite():
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from flax import nnx
  from peft import PromptTuningConfig, TaskType, get_peft_model

  from persomux import prompts, train

  cfg, hf, trunk = _benchmark_models()
  b, t = FLAGS.batch, FLAGS.seq
  num_classes = 64
  pm = prompts.PersonaMux(num_classes, cfg.d_model, rngs=nnx.Rngs(FLAGS.seed))
  pm.mixtures[...] = 0.1 * jax.random.normal(jax.random.key(1), pm.mixtures.shape)
  opt = nnx.Optimizer(pm, train.make_tx(train.OptimConfig(), 100), wrt=prompts.PromptParam)
  rs = np.random.RandomState(FLAGS.seed)
  ids = rs.randint(3, cfg.vocab_size, (b, t)).astype(np.int32)
  batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((b, t), jnp.int32),
           "loss_mask": jnp.ones((b, t), jnp.float32), "soft_index": jnp.ones((b,), jnp.int32),
           "class_ids": jnp.asarray(rs.randint(0, num_classes, (b,)).astype(np.int32))}

  if FLAGS.mesh:
    from persomux import sharding

    sharding.shard_module(pm, _mesh())
    opt = nnx.Optimizer(pm, train.make_tx(train.OptimConfig(), 100), wrt=prompts.PromptParam)
    batch = sharding.shard_batch(batch, _mesh())

  def px_step():
    loss, _ = train.train_step(trunk, pm, opt, batch)
    loss.block_until_ready()

  flops = step_matmul_flops(train.train_step, (trunk, pm, opt), batch)
  px_t, px_med = _fastest(px_step, FLAGS.steps, FLAGS.warmup)

  # PEFT prompt tuning: 20 virtual tokens (= l + k), Adam over the prompt only.
  n_virtual = pm.num_tokens
  peft_model = get_peft_model(hf, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n_virtual))
  peft_model.train()
  topt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3, eps=1e-4)
  tids = torch.tensor(ids, dtype=torch.long)

  def peft_step():
    out = peft_model(input_ids=tids, labels=tids)
    out.loss.backward()
    topt.step()
    topt.zero_grad()

  pt_t, pt_med = _fastest(peft_step, FLAGS.steps, FLAGS.warmup)
  peak = matmul_flops_per_s()
  px_tps, pt_tps = b * t / px_t, b * t / pt_t
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, torch threads {torch.get_num_threads()}")
  print(f"model: llama d=512 L={cfg.num_layers} H=8 KV=4 ffn=1376 V=32000 fp32; batch {b}x{t}; "
        f"soft tokens {n_virtual}")
  _print_steps(px_t, px_med, pt_t, pt_med, b * t)
  print(f"persomux matmul FLOPs/step {flops / 1e9:.1f} GFLOP -> {flops / px_t / 1e9:.1f} GFLOP/s; "
        f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; fraction {flops / px_t / peak:.2f}")
  print(f"train ratio persomux/peft = {px_tps / pt_tps:.2f}")


def lora_suite():
  """The LoRA baseline's train step (rank 8 on q_proj, v_proj, Adam) against PEFT LoRA on the same model."""
  import jax.numpy as jnp
  import numpy as np
  import torch
  from flax import nnx
  from peft import LoraConfig, get_peft_model

  from persomux import train
  from persomux.models import lora

  cfg, hf, trunk = _benchmark_models()
  b, t = FLAGS.batch, FLAGS.seq
  lcfg = lora.LoRAConfig(rank=8, alpha=16.0, targets=("q_proj", "v_proj"))
  lora.attach(trunk, lcfg, seed=FLAGS.seed)
  if FLAGS.mesh:
    from persomux import sharding

    sharding.shard_module(trunk, _mesh(), sharding.trunk_spec)
  opt = nnx.Optimizer(trunk, train.make_tx(train.OptimConfig(), 100), wrt=lora.LoRAParam)
  ids = np.random.RandomState(FLAGS.seed).randint(3, cfg.vocab_size, (b, t)).astype(np.int32)
  batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((b, t), jnp.int32),
           "loss_mask": jnp.ones((b, t), jnp.float32)}
  if FLAGS.mesh:
    batch = sharding.shard_batch(batch, _mesh())

  def px_step():
    loss, _ = train.adapter_step(trunk, opt, batch)
    loss.block_until_ready()

  px_t, px_med = _fastest(px_step, FLAGS.steps, FLAGS.warmup)
  peft_model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0))
  peft_model.train()
  topt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3, eps=1e-4)
  tids = torch.tensor(ids, dtype=torch.long)

  def peft_step():
    peft_model(input_ids=tids, labels=tids).loss.backward()
    topt.step()
    topt.zero_grad()

  pt_t, pt_med = _fastest(peft_step, FLAGS.steps, FLAGS.warmup)
  flops, peak = step_matmul_flops(train.adapter_step, (trunk, opt), batch), matmul_flops_per_s()
  print(f"model: llama d=512 L={cfg.num_layers} H=8 KV=4 ffn=1376 V=32000 fp32; batch {b}x{t}; "
        f"LoRA rank 8 on q_proj, v_proj ({lora.count(cfg, lcfg):,} parameters)")
  _print_steps(px_t, px_med, pt_t, pt_med, b * t)
  print(f"persomux matmul FLOPs/step {flops / 1e9:.1f} GFLOP -> {flops / px_t / 1e9:.1f} GFLOP/s; "
        f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; fraction {flops / px_t / peak:.2f}")
  print(f"lora train ratio persomux/peft = {pt_t / px_t:.2f}")


def _print_steps(px_t: float, px_med: float, pt_t: float, pt_med: float, tokens: int) -> None:
  for name, fast, med in (("persomux", px_t, px_med), ("peft", pt_t, pt_med)):
    print(f"{name:9s} step {fast * 1e3:8.1f} ms  {tokens / fast:10.1f} tokens/s  "
          f"(fastest of {FLAGS.steps}; median {med * 1e3:.1f} ms)")


def _benchmark_models():
  """The train suite's model in both frameworks, with identical weights."""
  import tempfile

  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  from persomux.models import params

  cfg = benchmark_config(FLAGS.layers)
  torch.manual_seed(FLAGS.seed)
  hf_cfg = LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "dtype")})
  hf = LlamaForCausalLM(hf_cfg).float().eval()
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    trunk, _ = params.load_model(d, tokenizer=False, mesh=_mesh())
  return cfg, hf, trunk


def generate_suite():
  """8 rows, each a different persona, 32-token prompts, 64 new tokens (greedy),
  against transformers' generate of the same model with no adapter."""
  import jax
  import numpy as np
  import torch
  from flax import nnx

  from persomux import prompts, sampling

  cfg, hf, trunk = _benchmark_models()
  rows, plen, new = 8, 32, 64
  pm = prompts.PersonaMux(rows, cfg.d_model, rngs=nnx.Rngs(FLAGS.seed))
  pm.mixtures[...] = 0.1 * jax.random.normal(jax.random.key(1), pm.mixtures.shape)
  rs = np.random.RandomState(FLAGS.seed)
  ids = rs.randint(3, cfg.vocab_size, (rows, plen)).astype(np.int32)
  soft = sampling.SoftPrompts(pm, list(range(rows)), 1.0)

  def ours(prompt_ids, n):
    return sampling.generate_ids(trunk, prompt_ids, max_new_tokens=n, soft_prompts=soft,
                                 soft_index=np.ones((rows,), np.int32))

  px_t = _median_time(lambda: ours(ids, new), FLAGS.steps, 1)
  tids = torch.tensor(ids, dtype=torch.long)

  def theirs():
    with torch.no_grad():
      hf.generate(tids, attention_mask=torch.ones_like(tids), max_new_tokens=new, min_new_tokens=new,
                  do_sample=False, pad_token_id=0)

  hf_t = _median_time(theirs, FLAGS.steps, 1)
  # Per-step decode time at two prompt lengths: with a KV cache it should not grow with the
  # position. The decode loop alone, from one prefilled carry (no prefill in the times), 40 steps
  # less 8 (no per-call costs), each the fastest of 7.
  per_step = {pos: decode_step_seconds(trunk, rs.randint(3, cfg.vocab_size, (rows, pos - pm.num_tokens)), soft)
              for pos in (64, 448)}
  px_tps, hf_tps = rows * new / px_t, rows * new / hf_t
  floor, weight_bytes = weight_stream_floor(trunk, rows)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, torch threads {torch.get_num_threads()}")
  print(f"model: llama d=512 L={cfg.num_layers} V=32000 fp32; {rows} rows x {plen}-token prompts, "
        f"{new} new tokens, a different persona per row ({pm.num_tokens} soft tokens)")
  print(f"persomux      {px_t * 1e3:8.1f} ms  {px_tps:8.1f} new tokens/s")
  print(f"transformers  {hf_t * 1e3:8.1f} ms  {hf_tps:8.1f} new tokens/s")
  print(f"decode step at position 64: {per_step[64] * 1e3:.2f} ms; at position 448: {per_step[448] * 1e3:.2f} ms")
  print(f"floor: the step's weight products alone ({rows} rows x {weight_bytes / 2**20:.0f} MiB of weights, "
        f"no attention) take {floor * 1e3:.2f} ms; the step at position 64 is {per_step[64] / floor:.2f}x that")
  print(f"generate ratio persomux/transformers = {px_tps / hf_tps:.2f}")


def decode_step_seconds(trunk, ids, soft, short: int = 8, long: int = 40, repeats: int = 7) -> float:
  """Seconds per step of `sampling.generate_ids`' decode loop after the prompts `ids` (with
  `soft` soft prompts after each row's first token): the loop run `long` steps less the loop
  run `short`, over `long - short`, each from a copy of one prefilled carry, fastest of `repeats`."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from persomux import sampling

  carry, decode = sampling.start_decoding(trunk, np.asarray(ids, np.int32), max_new_tokens=long, soft_prompts=soft,
                                          soft_index=np.ones((len(ids),), np.int32))
  times = {short: [], long: []}
  for r in range(repeats + 1):  # round 0 compiles
    for n in times:
      fresh = jax.block_until_ready(jax.tree.map(jnp.copy, carry))
      t0 = time.perf_counter()
      jax.block_until_ready(decode(fresh, limit=jnp.int32(n)))
      if r:
        times[n].append(time.perf_counter() - t0)
  return (min(times[long]) - min(times[short])) / (long - short)


def weight_stream_floor(trunk, rows: int, steps: int = 16) -> tuple[float, int]:
  """`(seconds, bytes)`: one pass of `rows` vectors through every matrix of `trunk` (its
  projections and head; the embedding is a lookup), nothing else, each a separate array
  multiplied as a decode step multiplies it (`modeling.linear` under `few_row_products`).
  A decode step of a few rows must read every weight once, so on a CPU this is the floor
  of its time."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from persomux.models import modeling

  head = "embed_tokens" if trunk.lm_head is None else "lm_head"  # weights [..., out, in]
  stacked = [v.get_value() for path, v in nnx.to_flat_state(nnx.state(trunk, nnx.Param))
             if path[0] == head or any(str(k).endswith("_proj") for k in path)]
  mats = [m for w in stacked for m in (w.reshape(-1, *w.shape[-2:]) if w.ndim > 2 else w[None])]
  mats = [jnp.array(m) for m in mats]  # one array per layer's matrix

  @jax.jit
  def passes(mats):
    def one(i, acc):
      x = jnp.full((rows, 1), 1.0 + acc * 1e-30, mats[0].dtype)
      with modeling.few_row_products():
        return acc + sum(jnp.sum(modeling.linear(jnp.broadcast_to(x, (rows, w.shape[-1])), w)) for w in mats)
    return jax.lax.fori_loop(0, steps, one, jnp.zeros((), mats[0].dtype))

  passes(mats).block_until_ready()
  return _median_time(lambda: passes(mats).block_until_ready(), 3, 0) / steps, sum(w.nbytes for w in mats)


def _word_tokenizer(vocab: int):
  """A real tokenizer over `vocab` words "w0".."w{vocab-1}" (ids 0-2: pad, bos, eos)."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  words = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, vocab)}}
  tk = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def serve_suite():
  """The persona server under load: N concurrent clients against one at a time."""
  import threading

  import httpx
  import jax
  import numpy as np
  import uvicorn

  from persomux import data as data_lib
  from persomux.bank import Persona, PersonaBank
  from persomux.serving.app import Service, create_app
  from persomux.serving.engine import Engine

  import logging

  logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
  cfg, _, trunk = _benchmark_models()
  tok = _word_tokenizer(cfg.vocab_size)
  n, new = FLAGS.clients, FLAGS.serve_tokens
  rs = np.random.RandomState(FLAGS.seed)
  codes, code_tokens, bias_tokens = 64, 8, 12
  bank = PersonaBank(0.05 * rs.standard_normal((codes, code_tokens, cfg.d_model)).astype(np.float32),
                     0.05 * rs.standard_normal((bias_tokens, cfg.d_model)).astype(np.float32),
                     [Persona(f"p{i}", rs.standard_normal(codes).astype(np.float32), None, "bench") for i in range(n)])
  prompts = [" ".join(f"w{w}" for w in rs.randint(3, cfg.vocab_size, 32)) for _ in range(n)]
  fmt = data_lib.PromptFormatter(tok, "{persona}{soft}\n{context}\n", "no")

  def serve(slots: int):
    engine = Engine(trunk, tok, slots=slots, max_context=256, queue_size=max(n, 1)).start()
    server = uvicorn.Server(uvicorn.Config(create_app(Service(engine, bank, fmt, "bench")), host="127.0.0.1",
                                           port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
      time.sleep(0.05)
    return engine, server, thread

  def ask(url, i):
    body = {"model": "bench", "messages": [{"role": "user", "content": prompts[i]}], "persona": f"p{i}",
            "max_tokens": new, "temperature": 0}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()

  def run(slots: int, concurrent: bool):
    engine, server, thread = serve(slots)
    url = f"http://127.0.0.1:{server.config.port}"
    try:
      ask(url, 0)  # compile prefill and decode
      out = [None] * n
      t0 = time.perf_counter()
      if concurrent:
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, ask(url, i))) for i in range(n)]
        for t in threads:
          t.start()
        for t in threads:
          t.join(timeout=600)
      else:
        for i in range(n):
          out[i] = ask(url, i)
      elapsed = time.perf_counter() - t0
      status = engine.status()
    finally:
      server.should_exit = True
      thread.join(timeout=30)
      engine.stop()
    return elapsed, out, status

  t_batched, batched, status = run(min(n, 32), True)
  t_seq, sequential, _ = run(1, False)
  tokens = sum(r["usage"]["completion_tokens"] for r in batched)
  same = sum(a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
             for a, b in zip(batched, sequential))
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}")
  print(f"model: llama d={cfg.d_model} L={cfg.num_layers} V={cfg.vocab_size} fp32; {n} clients, each its own "
        f"persona ({bank.module.num_tokens} soft tokens), 32-word prompts, {new} new tokens, greedy")
  print(f"batched ({min(n, 32)} slots, {n} concurrent clients): {t_batched:.2f} s, {tokens / t_batched:.1f} "
        f"tokens/s, at most {status['max_active']} rows per step")
  print(f"sequential (1 slot, one client at a time): {t_seq:.2f} s, {tokens / t_seq:.1f} tokens/s")
  print(f"replies identical in both: {same}/{n}")
  print(f"serve ratio batched/sequential = {t_seq / t_batched:.2f}")


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def decode_carry_placed(carry, mesh, rows: int):
  """Abstract decode carry `carry` (`jax.eval_shape` of `sampling._prefill`) placed on `mesh` as the
  library's prefill places it: every KV cache, values `[reps, rows, kv, slots, head_dim]` and keys
  in either layout (`sampling.key_block`), by `sharding.cache_spec`; other per-row arrays over the
  batch axes; the rest replicated."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from persomux import sharding

  def spec(path, x):
    if any(getattr(k, "key", None) == "layers" for k in path):
      return sharding.cache_spec(x.shape, mesh)
    return P(sharding.BATCH_AXES) if x.ndim and x.shape[0] == rows else P()

  return jax.tree.map_with_path(lambda path, x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(sharding.auto_mesh(mesh), spec(path, x))), carry)


def scale_suite():
  """Compiles full-size steps from abstract shapes only (no weight is allocated)
  on simulated meshes and prints each one's per-device memory from the compiled
  executable (arguments + outputs - donated + temporaries):

    (a) Llama-3-8B stage 1 at the paper config: 32 rows x (512 + 20 soft
        tokens), bfloat16, remat "full", one device;
    (b) Gemma-2-27B stage 1 on fsdp:8, 4 rows x (512 + 20) per device;
    (c) Llama-3-8B stage 2, full batch of 1,000 personas x 100 examples, as
        micro-batches of 32 rows (accumulate and apply steps), one device;
    (d) Llama-3-8B decode, 64 rows at 4,096 positions of context, tensor:8.

  Every row carries loss on all 512 tokens (the most logits a row can have).
  The last line gives the four figures in GiB.
  """
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from persomux import prompts, sampling, sharding, train
  from persomux.models import modeling
  from persomux.models.config import TrunkConfig
  from persomux.models.modeling import Trunk

  gib = 2 ** 30
  seq, micro = 512, 32

  def place(module, mesh, spec_fn):
    for path, var in nnx.to_flat_state(nnx.state(module)):
      v = var.get_value()
      var.set_value(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(
          mesh, spec_fn(path, tuple(v.shape), mesh))))

  def trunk_on(cfg, mesh):
    trunk = nnx.eval_shape(lambda: Trunk(cfg, dtype=jnp.bfloat16, rngs=None, remat="full"))
    place(trunk, mesh, sharding.trunk_spec)
    return trunk

  def prompt_on(cfg, mesh, classes, wrt):
    pm, opt = nnx.eval_shape(lambda: (lambda p: (p, nnx.Optimizer(
        p, train.make_tx(train.OptimConfig(), 100), wrt=wrt)))(
            prompts.PersonaMux(classes, cfg.d_model, rngs=nnx.Rngs(0))))
    place(pm, mesh, sharding.prompt_spec)
    place(opt, mesh, lambda p, s, m: P())
    return pm, opt

  def batch_on(mesh, rows):
    bs = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding.batch_sharding(mesh, len(shape)))
    return {"input_ids": bs((rows, seq), jnp.int32), "attention_mask": bs((rows, seq), jnp.int32),
            "loss_mask": bs((rows, seq), jnp.float32), "soft_index": bs((rows,), jnp.int32),
            "class_ids": bs((rows,), jnp.int32), "targets": bs((rows, seq), jnp.int32)}

  def per_device(compiled) -> float:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes) / gib

  def compile_(label, lowered):
    t0 = time.perf_counter()
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    print(f"  {label}: compiled in {time.perf_counter() - t0:.1f} s; args {m.argument_size_in_bytes / gib:.2f} "
          f"GiB, temp {m.temp_size_in_bytes / gib:.2f} GiB, per device {per_device(compiled):.2f} GiB", flush=True)
    return compiled

  # The decode loop an accelerator runs: scanned, over stacked weights, with whole products (the
  # CPU defaults unroll it and split its few-row products; see `sampling.DECODE_UNROLLED`).
  sampling.DECODE_UNROLLED = False
  modeling.SPLIT_ROWS = 0
  devices = jax.devices()
  if FLAGS.scale_topology:
    from jax.experimental import topologies
    try:
      devices = topologies.get_topology_desc(platform="tpu", topology_name=FLAGS.scale_topology).devices
    except Exception as e:  # noqa: BLE001 -- jax raises several kinds here
      raise SystemExit(f"--scale_topology={FLAGS.scale_topology}: no TPU compiler for it ({e}); the deviceless "
                       "compile needs libtpu, no TPU: pip install --target .libtpu 'libtpu==0.0.42.*', "
                       "then PYTHONPATH=.libtpu (README, \"Which meshes fit\")") from e
    print(f"compiling for {FLAGS.scale_topology}, deviceless: {len(devices)} x {devices[0].device_kind}", flush=True)
    sampling.KEY_BLOCK = 0  # the cache layout a TPU host uses (the default follows this CPU host)
  else:
    print(f"compiling for {len(devices)} simulated {devices[0].platform} devices", flush=True)

  def mesh_of(spec):
    n = int(np.prod([int(p.split(":")[1]) for p in spec.split(",")]))
    return sharding.parse_mesh(spec, devices=devices[:n])

  out = {}
  wanted = set(FLAGS.scale_cases)

  def stage1(key, cfg, spec, rows_per_device):
    mesh = mesh_of(spec)
    rows = rows_per_device * mesh.shape["data"] * mesh.shape["fsdp"]
    print(f"{key}: stage-1 train step (W, b and m), {rows} rows x ({seq} + 20) tokens on {spec}", flush=True)
    pm, opt = prompt_on(cfg, mesh, 1024, prompts.PromptParam)
    compiled = compile_("train_step", train.train_step.lower(trunk_on(cfg, mesh), pm, opt, batch_on(mesh, rows)))
    out[key] = per_device(compiled)

  if "llama3_8b_stage1" in wanted:
    stage1("llama3_8b_stage1", TrunkConfig.llama3_8b(), "data:1", 32)
  if "gemma2_27b_stage1_fsdp8" in wanted:
    stage1("gemma2_27b_stage1_fsdp8", TrunkConfig.gemma2_27b(), "fsdp:8", 4)
  if "llama3_8b_stage2_full" in wanted:
    cfg, mesh = TrunkConfig.llama3_8b(), mesh_of("data:1")
    personas, examples = 1000, 100
    print(f"llama3_8b_stage2_full: stage 2 (m only), full batch of {personas} personas x {examples} examples "
          f"= {personas * examples:,} rows as {personas * examples // micro:,} micro-batches of {micro}", flush=True)
    trunk = trunk_on(cfg, mesh)
    pm, opt = prompt_on(cfg, mesh, personas, prompts.Mixtures)
    acc = jax.eval_shape(lambda: train.empty_accumulator(pm, prompts.Mixtures))
    acc = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
        sharding.auto_mesh(mesh), P())), acc)
    a = compile_("accumulate_step", train.accumulate_step.lower(trunk, pm, opt, batch_on(mesh, micro), acc))
    b = compile_("apply_step", train.apply_step.lower(pm, opt, acc))
    out["llama3_8b_stage2_full"] = max(per_device(a), per_device(b))
  if "llama3_8b_decode_tp8" in wanted:
    cfg, mesh = TrunkConfig.llama3_8b(), mesh_of("tensor:8")
    rows, context, new = 64, 4096, 256
    print(f"llama3_8b_decode_tp8: decode, {rows} rows at {context} positions ({context - new} prompt + {new} "
          f"new) on tensor:8", flush=True)
    graphdef, state = nnx.split(trunk_on(cfg, mesh))
    bs = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding.batch_sharding(mesh, len(shape)))
    carry = jax.eval_shape(functools.partial(sampling._prefill, graphdef, max_new=new), state,
                           bs((rows, context - new, cfg.d_model), jnp.bfloat16), bs((rows, context - new), jnp.int32),
                           jax.random.key(0))
    carry = decode_carry_placed(carry, mesh, rows)
    compiled = compile_("decode", sampling._decode.lower(graphdef, state, carry, np.zeros((1,), np.int32),
                                                         np.int32(new), temperature=0.0, top_k=None, top_p=None))
    out["llama3_8b_decode_tp8"] = per_device(compiled)
  budget = dict(zip(SCALE_CASES, (40, 14, 40, 16)))
  for key in SCALE_CASES:
    if key in out:
      print(f"{key:<26}{out[key]:8.2f} GiB per device; budget {budget[key]} GiB: "
            f"{'fits' if out[key] <= budget[key] else 'OVER'}")
  print("scale GiB per device: " + " ".join(f"{k}={out[k]:.2f}" for k in SCALE_CASES if k in out), flush=True)


def main(argv):
  del argv
  if FLAGS.suite == "scale":
    if not FLAGS.scale_topology:  # simulated devices must be requested before jax starts
      os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    scale_suite()
    return
  if FLAGS.suite == "train":
    train_suite()
  elif FLAGS.suite == "lora":
    lora_suite()
  elif FLAGS.suite == "generate":
    generate_suite()
  elif FLAGS.suite == "serve":
    serve_suite()


def run():
  """Console entry point."""
  from persomux import host

  # Before anything runs, for both sides (persomux and its PyTorch peer share this process): once more
  # with glibc's large blocks on huge pages (persomux.host).
  host.reexec_with_huge_pages()
  app.run(main)


if __name__ == "__main__":
  run()
