"""The persona server (`launch/serve.py`), started for real on a free localhost
port and driven by real clients: the `openai` Python client and httpx.

A tiny trunk with a ChatML chat template serves a run whose stage 1 trained a
codebook on a synthetic population. Every loop is bounded and every request
goes to 127.0.0.1.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from openai import NotFoundError, OpenAI
from transformers import LlamaConfig, LlamaForCausalLM

import persomux
from persomux import data, sampling, stages, synthetic
from persomux.bank import PersonaBank
from persomux.tokenizer import train_bpe_tokenizer
from configs import tiny
from tests.test_launch import cached_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_run(tmp, *, train: bool = True, stage2: tuple[str, ...] = ()) -> tuple[str, str]:
  """A tiny run in `tmp`: a random ChatML trunk and a synthetic population; stage 1
  trained (`train`) or written untrained as stage 1 writes it, its mixtures spread
  apart either way; and, for each method in `stage2` ("persona_mux", "soft_prompt"),
  an untrained stage-2 state of the held-out classes as stage 2 writes it (what the
  server reads; what the prompts learned does not matter there). Returns
  (workdir, model_dir)."""
  records = synthetic.make_corpus(synthetic.SyntheticCorpusConfig(num_personas=8, examples_per_persona=6))
  tok = train_bpe_tokenizer(synthetic.population_text(records), vocab_size=300)
  tok.chat_template = CHATML
  torch.manual_seed(0)
  hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                    max_position_embeddings=1024))
  model_dir = tmp / "tiny-chat"
  hf.save_pretrained(model_dir)
  tok.save_pretrained(model_dir)
  cfg = tiny.get_config()
  cfg.model_dir = str(model_dir)
  cfg.data.path = str(tmp / "records.jsonl")
  synthetic.write_jsonl(records, cfg.data.path)
  cfg.data.use_chat_template = "yes"
  cfg.data.finetune_fraction = 0.25
  cfg.pretrain.epochs = 1
  workdir = str(tmp / "run")
  stages.save_run(cfg, workdir)
  trunk, tok = persomux.load_model(str(model_dir))
  d, pc = trunk.config.d_model, cfg.prompt.to_dict()
  split = stages.Split.make(data.load_records(cfg.data.path)[0], cfg.to_dict(), workdir)
  if train:
    stages.pretrain(cfg, workdir, trunk, tok, progress=False)
  else:
    stages.save_prompt(workdir, "pretrain", stages.build_prompt("persona_mux", len(split.pretrain), d, pc, 0,
                                                                stages.embedding_std(trunk)),
                       {"method": "persona_mux", "classes": split.pretrain, "prompt": pc})
  # One short epoch leaves the mixtures near zero, so every persona of a random
  # trunk would say the same; spread them so that serving the wrong one shows.
  rng = np.random.default_rng(0)
  module, meta = stages.load_prompt(workdir, "pretrain", d)
  module.mixtures[...] = 20.0 * rng.standard_normal(module.mixtures.shape).astype(np.float32)
  stages.save_prompt(workdir, "pretrain", module, meta)
  for method in stage2:
    held = stages.build_prompt(method, len(split.finetune), d, pc, 1, stages.embedding_std(trunk))
    if method == "persona_mux":
      held.codebook[...], held.bias[...] = module.codebook[...], module.bias[...]
      held.mixtures[...] = 20.0 * rng.standard_normal(held.mixtures.shape).astype(np.float32)
    stages.save_prompt(workdir, f"finetune_{method}", held, {"method": method, "classes": split.finetune,
                                                            "prompt": pc})
  return workdir, str(model_dir)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return make_run(tmp_path_factory.mktemp("serve"))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  """launch/serve.py in a subprocess on a free port, its output in a temporary file
  (a pipe nobody reads would fill and stall it); `feed=False` adds --nofeed, so no
  feed posts share the engine with what a test measures; `env` adds variables."""

  def __init__(self, workdir, *flags, feed: bool = False, env: dict | None = None):
    flags = flags + (() if feed else ("--nofeed",))
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    env = {**cached_env(), **(env or {})}  # one device unless `env` asks, compiled into the session's cache
    fd, self.log_path = tempfile.mkstemp(prefix="serve-", suffix=".log")
    os.close(fd)
    self.log = open(self.log_path, "a")  # O_APPEND: reading it never moves where the server writes
    self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "serve.py"), f"--workdir={workdir}",
                                  f"--port={self.port}", *flags], stdout=self.log, stderr=subprocess.STDOUT,
                                 text=True, env=env, cwd=ROOT)
    deadline = time.time() + 180
    while time.time() < deadline:
      if self.proc.poll() is not None:
        raise AssertionError(f"serve.py exited {self.proc.returncode}:\n{self.output()[-3000:]}")
      try:
        if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
          return
      except httpx.HTTPError:
        pass
      time.sleep(0.5)
    self.close()
    raise AssertionError(f"serve.py did not answer /health within 180 s:\n{self.output()[-3000:]}")

  def output(self) -> str:
    with open(self.log_path) as f:
      return f.read()

  def health(self) -> dict:
    return httpx.get(f"{self.url}/health", timeout=10).json()

  def close(self):
    self.proc.terminate()
    try:
      self.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait(timeout=30)
    self.log.close()
    os.remove(self.log_path)


@pytest.fixture(scope="module")
def server(run_dir):
  s = Server(run_dir[0], "--slots=4", "--max_context=256", "--max_tokens=16")
  yield s
  s.close()


@pytest.fixture(scope="module")
def client(server):
  return OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=120, max_retries=0)


def _model(client) -> str:
  return client.models.list().data[0].id


def _greedy_reference(run_dir, persona, messages, n):
  """`persomux.generate`'s greedy reply for one persona, computed in this process."""
  workdir, model_dir = run_dir
  trunk, tok = persomux.load_model(model_dir)
  bank = PersonaBank.load(workdir)
  fmt = stages.formatter_for(tok, stages.load_run(workdir))
  pre, suf = fmt.chat_pieces(bank[persona].text, messages)
  return sampling.generate_rows(trunk, tok, [(pre + suf, len(pre))], max_new_tokens=n,
                                soft_prompts=bank.soft_prompts([persona]))[0]


def test_models_and_personas(server, client, run_dir):
  models = client.models.list().data
  assert [m.id for m in models] == ["tiny-chat"]
  listed = httpx.get(f"{server.url}/v1/personas").json()["data"]
  split = json.load(open(os.path.join(run_dir[0], "split.json")))
  assert {p["name"] for p in listed} == set(split["pretrain"])
  assert all(p["job"] == "stage 1" for p in listed)


def test_two_personas_in_one_batch_equal_their_own_generation(server, client, run_dir):
  names = [p["name"] for p in httpx.get(f"{server.url}/v1/personas").json()["data"]][:2]
  messages = [{"role": "user", "content": "What is the harbor like?"}]
  model = _model(client)
  replies = {}

  def ask(name):
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0,
                                       extra_body={"persona": name})
    replies[name] = r

  threads = [threading.Thread(target=ask, args=(n,)) for n in names * 2]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert server.health()["max_active"] >= 2  # they shared decode steps
  for name in names:
    ref = _greedy_reference(run_dir, name, messages, 24)
    assert replies[name].choices[0].message.content == ref, name
    assert replies[name].usage.completion_tokens >= 1
  assert replies[names[0]].choices[0].message.content != replies[names[1]].choices[0].message.content


def test_streaming_equals_the_whole_reply(client, server):
  name = httpx.get(f"{server.url}/v1/personas").json()["data"][2]["name"]
  kw = dict(model=_model(client), messages=[{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Any plans today?"}],
            max_tokens=20, temperature=0.8, top_p=0.9, seed=11, extra_body={"persona": name, "bias_scale": 0.5})
  whole = client.chat.completions.create(**kw)
  chunks = list(client.chat.completions.create(stream=True, **kw))
  streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert streamed == whole.choices[0].message.content
  assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
  # A seed makes sampling reproducible; another seed gives another draw.
  assert client.chat.completions.create(**kw).choices[0].message.content == streamed
  others = {client.chat.completions.create(**dict(kw, seed=s)).choices[0].message.content for s in range(4)}
  assert len(others) > 1


def test_stop_strings_cut_the_reply(client, server):
  name = httpx.get(f"{server.url}/v1/personas").json()["data"][0]["name"]
  kw = dict(model=_model(client), messages=[{"role": "user", "content": "Hello"}], max_tokens=30, temperature=0,
            extra_body={"persona": name})
  full = client.chat.completions.create(**kw).choices[0].message.content
  assert len(full) > 4
  stop = full[3:5]
  cut = client.chat.completions.create(stop=[stop], **kw).choices[0]
  assert cut.message.content == full[:full.find(stop)] and cut.finish_reason == "stop"
  streamed = "".join(c.choices[0].delta.content or "" for c in
                     client.chat.completions.create(stop=stop, stream=True, **kw) if c.choices)
  assert streamed == cut.message.content


def test_errors_are_json_and_the_server_survives(server, client):
  url = f"{server.url}/v1/chat/completions"
  ok = {"model": _model(client), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
  cases = [
      (dict(ok, model="gpt-4"), 404, "gpt-4"),
      (dict(ok, persona="nobody"), 404, "nobody"),
      ({"model": ok["model"]}, 422, "messages"),
      (dict(ok, temperature=-1), 422, "temperature"),
      (dict(ok, messages=[{"role": "wizard", "content": "x"}]), 422, "role"),
      (dict(ok, messages=[{"role": "user", "content": "harbor " * 400}]), 400, "context"),
  ]
  for body, status, word in cases:
    r = httpx.post(url, json=body, timeout=30)
    assert r.status_code == status, (body, r.text)
    assert word in r.json()["error"]["message"], r.text
  r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
  assert r.status_code == 422 and "error" in r.json()
  with pytest.raises(NotFoundError):
    client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
  assert httpx.get(f"{server.url}/v1/jobs/none").status_code == 404
  assert server.health()["status"] == "ok"


def test_a_disconnected_client_frees_its_slot(server, client):
  before = server.health()
  body = {"model": _model(client), "messages": [{"role": "user", "content": "Tell me everything."}],
          "max_tokens": 200, "temperature": 1.0, "seed": 3, "stream": True}
  with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
    for line in r.iter_lines():
      if line.startswith("data: ") and '"content"' in line:
        break  # one chunk, then hang up
  deadline = time.time() + 30
  while time.time() < deadline and server.health()["active"]:
    time.sleep(0.1)
  after = server.health()
  assert after["active"] == 0 and after["queued"] == 0
  assert after["generated_tokens"] - before["generated_tokens"] < 200


def test_queue_full_gets_429(run_dir):
  s = Server(run_dir[0], "--slots=1", "--queue_size=1", "--max_context=512")
  try:
    model = httpx.get(f"{s.url}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 300,
            "temperature": 1.0, "seed": 1}
    codes = []

    def post():
      codes.append(httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=120).status_code)

    threads = [threading.Thread(target=post) for _ in range(6)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(timeout=120)
    assert 429 in codes and 200 in codes, codes
    assert s.health()["status"] == "ok"
  finally:
    s.close()


def test_adding_personas_while_serving(server, client, run_dir):
  records = [{"class": f"guest_{i}", "text": t, "context": "hello"}
             for i in range(2) for t in ("the tower at dawn", "a quiet harbor", "the market is loud")]
  r = httpx.post(f"{server.url}/v1/personas", json={"records": records, "job": "guests"}, timeout=30)
  assert r.status_code == 202, r.text
  deadline = time.time() + 300
  while time.time() < deadline:
    job = httpx.get(f"{server.url}/v1/jobs/guests", timeout=10).json()
    if job["status"] in ("done", "failed"):
      break
    time.sleep(1)
  assert job["status"] == "done", job
  assert set(job["result"]["per_persona"]) == {"guest_0", "guest_1"}
  names = {p["name"]: p["job"] for p in httpx.get(f"{server.url}/v1/personas").json()["data"]}
  assert names["guest_1"] == "guests"
  reply = client.chat.completions.create(model=_model(client), messages=[{"role": "user", "content": "hello"}],
                                         max_tokens=6, temperature=0, extra_body={"persona": "guest_1"})
  assert reply.choices[0].finish_reason in ("stop", "length")
  bad = httpx.post(f"{server.url}/v1/personas", json={"records": [], "job": "x"}, timeout=30)
  assert bad.status_code == 422
  clash = httpx.post(f"{server.url}/v1/personas", json={"records": records, "job": "again"}, timeout=30)
  assert clash.status_code == 202
  deadline = time.time() + 120
  while time.time() < deadline and httpx.get(f"{server.url}/v1/jobs/again").json()["status"] not in ("done", "failed"):
    time.sleep(0.5)
  failed = httpx.get(f"{server.url}/v1/jobs/again").json()
  assert failed["status"] == "failed" and "guest_0" in failed["error"]


def test_drift_steered_replies_equal_drift_generate(run_dir):
  """`drift` names a stored user's weights; the steered reply equals persomux's Drift
  decoding outside the server, and an unsteered request in the same batch is unchanged."""
  from persomux import drift

  workdir, model_dir = run_dir
  trunk, tok = persomux.load_model(model_dir)
  pairs = [drift.Pair("What is the harbor like?", "The harbor is calm and quiet.", "harbor lol"),
           drift.Pair("Any plans?", "I shall visit the market.", "market, whatever")]
  attrs = {"Formal": "You are an AI assistant with a formal tone.", "Humor": "You are a humorous AI assistant.",
           "Concise": "You are an AI assistant with a concise response rather than verbosity."}
  w = drift.fit(trunk, tok, pairs, attrs, k=3)
  w.save(os.path.join(workdir, "drift", "ann.json"))
  # A strong pull (beta 0.05): a random tiny trunk's attribute prompts differ only a little.
  s = Server(workdir, "--slots=2", "--max_context=256", "--drift_streams=4", "--drift_beta=0.05")
  try:
    client = OpenAI(base_url=f"{s.url}/v1", api_key="unused", timeout=120, max_retries=0)
    name = httpx.get(f"{s.url}/v1/personas").json()["data"][1]["name"]
    messages = [{"role": "user", "content": "Tell me about the tower."}]
    out = {}

    def ask(key, extra):
      out[key] = client.chat.completions.create(model=_model(client), messages=messages, max_tokens=16,
                                                temperature=0, extra_body={"persona": name, **extra})

    threads = [threading.Thread(target=ask, args=("drift", {"drift": "ann"})),
               threading.Thread(target=ask, args=("plain", {}))]
    for t in threads:
      t.start()
    for t in threads:
      t.join(timeout=120)
    bank = PersonaBank.load(workdir)
    fmt = stages.formatter_for(tok, stages.load_run(workdir))
    pre, suf = fmt.chat_pieces(bank[name].text, messages)
    row = [(pre + suf, len(pre))]
    steered = sampling.generate_rows(trunk, tok, row, max_new_tokens=16, soft_prompts=bank.soft_prompts([name]),
                                     logit_streams=drift.streams(trunk, tok, [w], [messages[0]["content"]], beta=0.05))[0]
    plain = sampling.generate_rows(trunk, tok, row, max_new_tokens=16, soft_prompts=bank.soft_prompts([name]))[0]
    assert out["drift"].choices[0].message.content == steered
    assert out["plain"].choices[0].message.content == plain
    assert steered != plain  # the weights really steer
    r = httpx.post(f"{s.url}/v1/chat/completions", json={"model": _model(client), "messages": messages,
                                                          "drift": "nobody"}, timeout=30)
    assert r.status_code == 404 and "nobody" in r.json()["error"]["message"]
  finally:
    s.close()


@pytest.mark.parametrize("unrolled", [False, True])
def test_engine_greedy_replies_equal_transformers_in_both_decode_layouts(tmp_path, monkeypatch, unrolled):
  """The engine's step reads stacked weights and caches (the accelerator layout, scanned) or, on
  CPU by default, weights sliced out once and caches kept per layer. Either way, three prompts
  through two slots (one slot reused after a reply ends) reply with transformers' greedy tokens."""
  from persomux.serving.engine import Engine, Request

  monkeypatch.setattr(sampling, "DECODE_UNROLLED", unrolled)
  records = synthetic.make_corpus(synthetic.SyntheticCorpusConfig(num_personas=3, examples_per_persona=4))
  tok = train_bpe_tokenizer(synthetic.population_text(records), vocab_size=200)
  torch.manual_seed(1)
  hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
  hf.save_pretrained(tmp_path / "m")
  tok.save_pretrained(tmp_path / "m")
  trunk, tok = persomux.load_model(str(tmp_path / "m"))
  text = synthetic.population_text(records)
  prompts = [tok(t, add_special_tokens=False)["input_ids"][:n] for t, n in zip(text, (5, 11, 17))]
  new = 12
  refs = []
  for ids in prompts:
    with torch.no_grad():
      out = hf.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
    ref = out[0, len(ids):].tolist()
    refs.append(ref[:ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref)

  engine = Engine(trunk, tok, slots=2, max_context=64).start()
  assert (engine._layers is not None) == unrolled
  done = [threading.Event() for _ in prompts]
  reqs = [Request(prompt_ids=ids, soft_index=0, temperature=0.0, max_tokens=new,
                  emit=lambda text, finish, e=e: finish is not None and e.set()) for ids, e in zip(prompts, done)]
  try:
    for r in reqs:
      engine.submit(r)
    for e in done:
      assert e.wait(timeout=120), engine.status()
  finally:
    engine.stop()
  assert [len(r) for r in refs] == [new] * 3 and [len(p) for p in prompts] == [5, 11, 17]
  assert [r.tokens for r in reqs] == refs
  assert engine.status()["max_active"] == 2 and engine.error is None
