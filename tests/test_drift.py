"""Drift approximation (`persomux.drift`): W − L, p and predictions against a
direct computation with transformers on a tiny model; accumulation; weights
I/O; pairs-file errors; the `launch/drift.py` fit and predict commands."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import persomux
from persomux import data as data_lib
from persomux import drift, synthetic
from persomux.tokenizer import train_bpe_tokenizer
from tests.test_launch import run as run_launch

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ATTRS = {"Formal": "You are an AI assistant with a formal tone.", "Humor": "You are a humorous AI assistant.",
         "Concise": "You are an AI assistant with a concise response rather than verbosity.",
         "Pirate": "You talk like a pirate."}
PAIRS = [drift.Pair("What is the harbor like?", "The harbor is calm and quiet.", "harbor lol so wild!!"),
         drift.Pair("Any plans?", "I shall visit the market.", "market time, whatever"),
         drift.Pair("Tell me a story.", "Once, a tower stood by the sea.", "uh, towers, I guess"),
         drift.Pair("How was your day?", "It was pleasant, thank you.", "meh")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("drift")
  records = synthetic.make_corpus(synthetic.SyntheticCorpusConfig(num_personas=4, examples_per_persona=6))
  text = synthetic.population_text(records) + [p.prompt + " " + p.chosen + " " + p.rejected for p in PAIRS]
  tok = train_bpe_tokenizer(text + list(ATTRS.values()) + [drift.BASE_PROMPT], vocab_size=400)
  tok.chat_template = CHATML
  torch.manual_seed(0)
  hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
  d = str(tmp / "tiny")
  hf.save_pretrained(d)
  tok.save_pretrained(d)
  model, tok = persomux.load_model(d)
  return d, model, tok


def hf_logprob(hf, tok, system, prompt, response) -> float:
  """log π(response | prompt, system) summed over the response tokens, computed directly."""
  text = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                                 tokenize=False, add_generation_prompt=True)
  pid = tok(text, add_special_tokens=False)["input_ids"]
  rid = tok(response, add_special_tokens=False)["input_ids"]
  ids = torch.tensor([pid + rid])
  with torch.no_grad():
    logp = torch.log_softmax(hf(input_ids=ids).logits[0].double(), -1)
  return float(sum(logp[len(pid) + i - 1, t] for i, t in enumerate(rid)))


def test_w_minus_l_and_p_equal_a_direct_computation(tiny):
  d, model, tok = tiny
  hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
  base = np.array([[hf_logprob(hf, tok, drift.BASE_PROMPT, p.prompt, y) for y in (p.chosen, p.rejected)]
                   for p in PAIRS])
  ref_w, ref_l = [], []
  for s in ATTRS.values():
    lp = np.array([[hf_logprob(hf, tok, s, p.prompt, y) for y in (p.chosen, p.rejected)] for p in PAIRS])
    ref_w.append(lp[:, 0] - base[:, 0])
    ref_l.append(lp[:, 1] - base[:, 1])
  ref_w, ref_l = np.array(ref_w), np.array(ref_l)
  w, l = drift.differences(model, tok, PAIRS, ATTRS, drift.BASE_PROMPT, batch_size=4)
  np.testing.assert_allclose(w, ref_w, atol=2e-4)
  np.testing.assert_allclose(l, ref_l, atol=2e-4)
  weights = drift.fit(model, tok, PAIRS, ATTRS, k=2, batch_size=4)
  v = (ref_w - ref_l).sum(1)
  np.testing.assert_allclose(weights.v, v, atol=5e-4)
  # float32 log-probabilities of a random tiny model differ little between prompts, so
  # ‖v‖ is small and normalizing it magnifies rounding: p agrees to 1e-3.
  np.testing.assert_allclose(weights.p, v / np.linalg.norm(v), atol=1e-3)
  top = sorted(np.argsort(-np.abs(v))[:2])
  assert weights.selected == list(top)
  scores = drift.predict(weights, model, tok, PAIRS, batch_size=4)
  np.testing.assert_allclose(scores, (v / np.linalg.norm(v))[top] @ (ref_w - ref_l)[top], atol=1e-3)


def test_more_pairs_extend_the_sums_and_weights_round_trip(tiny, tmp_path):
  _, model, tok = tiny
  whole = drift.fit(model, tok, PAIRS, ATTRS, k=3, batch_size=4)
  first = drift.fit(model, tok, PAIRS[:2], ATTRS, k=3, batch_size=4)
  both = drift.fit(model, tok, PAIRS[2:], ATTRS, k=3, batch_size=4, previous=first)
  np.testing.assert_allclose(both.v, whole.v, atol=1e-4)
  assert both.num_pairs == 4
  with pytest.raises(ValueError, match="other attributes"):
    drift.fit(model, tok, PAIRS, {"Formal": ATTRS["Formal"]}, previous=first)
  path = str(tmp_path / "w.json")
  whole.save(path)
  back = drift.DriftWeights.load(path)
  assert back.attributes == whole.attributes and back.top() == pytest.approx(whole.top())
  saved = json.load(open(path))
  assert len(saved["weights"]) == 3 and sum(a["selected"] for a in saved["attributes"]) == 3
  assert {a["name"]: a["prompt"] for a in saved["attributes"]} == ATTRS
  assert len(drift.DEFAULT_ATTRIBUTES) == 41


def test_bad_pairs_files_name_the_line(tmp_path):
  good = {"prompt": "p", "chosen": "a", "rejected": "b"}
  cases = {"missing.jsonl": [good, {"prompt": "p", "chosen": "a"}],
           "empty_field.jsonl": [good, good, dict(good, chosen=" ")],
           "not_json.jsonl": None, "empty.jsonl": []}
  for name, rows in cases.items():
    path = tmp_path / name
    path.write_text("{oops\n" if rows is None else "".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(drift.PairsError, match=r"missing.jsonl:2: field 'rejected'"):
    drift.load_pairs(str(tmp_path / "missing.jsonl"))
  with pytest.raises(drift.PairsError, match=r"empty_field.jsonl:3: field 'chosen'"):
    drift.load_pairs(str(tmp_path / "empty_field.jsonl"))
  with pytest.raises(drift.PairsError, match=r"not_json.jsonl:1: not JSON"):
    drift.load_pairs(str(tmp_path / "not_json.jsonl"))
  with pytest.raises(drift.PairsError, match="empty"):
    drift.load_pairs(str(tmp_path / "empty.jsonl"))


def test_fit_and_predict_launches(tiny, tmp_path):
  d, _, _ = tiny
  pairs = tmp_path / "pairs.jsonl"
  rows = [dict(prompt=p.prompt, chosen=p.chosen, rejected=p.rejected, user=u) for u in ("ann", "bo") for p in PAIRS]
  data_lib.write_jsonl(rows, str(pairs))
  attrs = tmp_path / "attrs.json"
  attrs.write_text(json.dumps(ATTRS))
  # Launched as the launch tests launch theirs (fast XLA:CPU compiles, one compilation cache).
  run = lambda *a: run_launch("drift.py", *a, check=False)
  fit = run("fit", f"--pairs={pairs}", f"--model={d}", f"--out={tmp_path / 'users'}", f"--attributes={attrs}",
            "--k=2")
  assert fit.returncode == 0, fit.stderr[-2000:]
  assert (tmp_path / "users" / "ann.json").is_file() and (tmp_path / "users" / "bo.json").is_file()
  pred = run("predict", f"--weights={tmp_path / 'users'}", f"--pairs={pairs}")
  assert pred.returncode == 0, pred.stderr[-2000:]
  last = pred.stdout.strip().splitlines()[-1]
  assert last.startswith("drift accuracy = ") and len(last.split("= ")[1]) == 5
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
  out = run("fit", f"--pairs={bad}", f"--model={d}", f"--out={tmp_path / 'x.json'}")
  assert out.returncode != 0 and "bad.jsonl:1: field 'rejected'" in out.stderr


# --- Drift decoding -----------------------------------------------------------------------


def _rows(tok, messages):
  """Generator prompts (a plain chat prompt per message) as `(ids, soft_index)` rows."""
  out = []
  for x in messages:
    text = tok.apply_chat_template([{"role": "user", "content": x}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out.append((ids, 0))
  return out


def _tokens(model, tok, rows, n, **kw):
  from persomux import sampling

  t = max(len(r) for r, _ in rows)
  ids = np.zeros((len(rows), t), np.int32)
  for i, (r, _) in enumerate(rows):
    ids[i, :len(r)] = r
  return sampling.generate_ids(model, ids, np.array([len(r) for r, _ in rows]), max_new_tokens=n,
                               soft_index=np.array([s for _, s in rows]), **kw)


@pytest.fixture(scope="module")
def persona_mux(tiny):
  """A Persona-Mux prompt of 3 personas, its mixtures spread apart so that they steer."""
  import jax
  from flax import nnx

  from persomux import prompts

  _, model, _ = tiny
  pm = prompts.PersonaMux(3, model.config.d_model, num_codes=4, code_tokens=2, bias_tokens=2, init_std=0.5,
                          rngs=nnx.Rngs(1))
  pm.mixtures[...] = jax.random.normal(jax.random.key(2), pm.mixtures.shape)
  return pm


# The decoding tests share compiled programs where their shapes agree: every row carries
# soft tokens (one prompt bucket), and single rows have the shapes of the mixed batch's
# rows alone.


def test_drift_with_zero_weights_is_bit_identical(tiny, persona_mux):
  from persomux import sampling

  _, model, tok = tiny
  weights = drift.fit(model, tok, PAIRS, ATTRS, k=3, batch_size=4)
  weights.v = np.zeros_like(weights.v)  # p = 0
  msgs = ["What is the harbor like?"]
  rows = _rows(tok, msgs)
  soft = sampling.SoftPrompts(persona_mux, [0], [1.0])
  for kw in (dict(), dict(temperature=1.0, top_p=0.9, seed=3)):
    plain = _tokens(model, tok, rows, 10, soft_prompts=soft, **kw)
    steered = _tokens(model, tok, rows, 10, soft_prompts=soft, logit_streams=drift.streams(model, tok, [weights], msgs),
                      **kw)
    np.testing.assert_array_equal(plain, steered)


def test_drift_decoding_equals_a_step_by_step_reference(tiny, persona_mux):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from persomux import sampling

  _, model, tok = tiny
  weights = drift.fit(model, tok, PAIRS, ATTRS, k=2, batch_size=4)
  msg = "Tell me a story."
  rows = _rows(tok, [msg])
  beta, n = 0.5, 10
  got = _tokens(model, tok, rows, n, soft_prompts=sampling.SoftPrompts(persona_mux, [0], [1.0]),
                logit_streams=drift.streams(model, tok, [weights], [msg], beta=beta))[0]
  # Outside the sampler: full forward passes over prompt + generated tokens, every step, no
  # cache; the generator's input is persona 0's soft tokens (b ⊕ Σ m W) then the tokens.
  keep = weights.selected
  systems = [weights.base_prompt] + [weights.attributes[weights.names[i]] for i in keep]
  streams = [drift._prompt_ids(tok, s, msg) for s in systems]
  soft = np.asarray(jnp.concatenate([persona_mux.bias[...], jnp.einsum("n,nkd->kd", persona_mux.mixtures[0],
                                                                         persona_mux.codebook[...])]))
  # Every sequence right-padded to one width, so that one compiled forward serves every
  # step; causal attention keeps the padding out of the real positions.
  width = len(soft) + max(len(s) for s in [rows[0][0], *streams]) + n
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(inputs_embeds=x))

  def last(seqs):
    x = np.zeros((len(seqs), width, model.config.d_model), np.float32)
    for r, e in enumerate(seqs):
      x[r, :len(e)] = e
    logits = np.asarray(forward(state, jnp.asarray(x)), np.float64)
    return [logits[r, len(e) - 1] for r, e in enumerate(seqs)]

  embed = lambda ids: np.asarray(model.embed(jnp.asarray(ids)[None]))[0]
  gen, moved = list(rows[0][0]), 0.0
  want = []
  for _ in range(n):
    h, *hs = last([np.concatenate([soft, embed(gen)])] + [embed(s + want) for s in streams])
    steer = sum(weights.p[i] * (hs[j + 1] - hs[0]) for j, i in enumerate(keep)) / beta
    moved = max(moved, float(np.abs(steer).max()))
    t = int(np.argmax(h + steer))
    want.append(t)
    gen.append(t)
    if t == tok.eos_token_id:
      break
  assert moved > 1e-3  # the streams really steer
  np.testing.assert_array_equal(got[:len(want)], want)


def test_mixed_drift_and_persona_batch_equals_rows_alone(tiny, persona_mux):
  from persomux import sampling

  _, model, tok = tiny
  ann = drift.fit(model, tok, PAIRS[:2], ATTRS, k=2, batch_size=4)
  bo = drift.fit(model, tok, PAIRS[2:], ATTRS, k=3, batch_size=4)
  msgs = ["What is the harbor like?", "Any plans?", "How was your day?"]
  users, personas, scales = [ann, None, bo], [0, 1, 2], [1.0, 0.5, 0.0]
  rows = _rows(tok, msgs)
  kw = dict(temperature=0.0)
  batch = _tokens(model, tok, rows, 10, soft_prompts=sampling.SoftPrompts(persona_mux, personas, scales),
                  logit_streams=drift.streams(model, tok, users, msgs), **kw)
  for r in range(3):
    # Alone, a row without Drift weights decodes without streams at all.
    streams = None if users[r] is None else drift.streams(model, tok, [users[r]], msgs[r:r + 1])
    alone = _tokens(model, tok, rows[r:r + 1], 10,
                    soft_prompts=sampling.SoftPrompts(persona_mux, [personas[r]], [scales[r]]), logit_streams=streams,
                    **kw)
    eos = np.flatnonzero(alone[0] == tok.eos_token_id)
    end = int(eos[0]) + 1 if len(eos) else 10
    np.testing.assert_array_equal(batch[r][:end], alone[0][:end])


# --- the preference benchmark -------------------------------------------------------------


def test_judge_measures_principles_by_hand():
  from persomux import preference_bench as pb

  text = "Hello! Please consider:\n- tea\n- cake\nHaha, isn't it fun?"
  got = dict(zip(pb.PRINCIPLES, pb.judge(text)))
  n = 9  # hello please consider tea cake haha isn't it fun
  assert got["verbose"] == pytest.approx(np.log1p(n))
  assert got["listy"] == pytest.approx(2 / 4)  # 2 list lines of 4
  assert got["inquisitive"] == pytest.approx(1 / np.sqrt(n))
  assert got["humorous"] == pytest.approx((1 + 1) / np.sqrt(n))  # one "!" and one "haha"
  assert got["polite"] == pytest.approx(1 / np.sqrt(n))  # "please"
  assert got["formal"] == pytest.approx((1 - 0 - 1) / np.sqrt(n))  # "consider"; one contraction


def test_users_and_pairs_follow_the_hidden_mapping():
  from persomux import preference_bench as pb

  a, b = pb.make_users(5, seed=1), pb.make_users(5, seed=2)
  assert not np.allclose(a.mapping, b.mapping)  # the mapping is resampled per seed
  np.testing.assert_allclose(pb.make_users(5, seed=1).directions, a.directions)
  d = a.attributes @ a.mapping
  np.testing.assert_allclose(a.directions, d / np.linalg.norm(d, axis=1, keepdims=True))
  util = np.array([0.0, 1.0, 0.1, -1.0])
  pairs = pb.preference_pairs(util, [[0, 1, 2, 3]], np.random.default_rng(0))
  assert all(util[c] > util[r] + 0.25 for c, r in pairs) and len(pairs) == 5  # 0-2 differ by 0.1 only
  # Logistic regression orders separable features.
  f = np.random.default_rng(0).normal(size=(40, 3)) + np.array([1.0, 0, 0])
  assert pb.logistic_accuracy(f[:30], f[30:]) >= 0.8


def test_standardized_scores_ignore_what_the_pool_never_varies_and_clip_outliers():
  from persomux import preference_bench as pb

  pool = np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0]])  # no candidate of the pool has the 2nd principle
  mean, std = pb.standardize(pool)
  np.testing.assert_allclose(mean, [2.0, 0.0])
  got = pb.zscores(np.array([[3.0, 5.0], [2.0 + 10 * np.sqrt(2 / 3), 0.0]]), mean, std)
  np.testing.assert_allclose(got, [[np.sqrt(3 / 2), 0.0], [pb.Z_CLIP, 0.0]])  # (3 - 2) / sqrt(2/3); 10 std -> 4


def test_preference_benchmark_runs_end_to_end(tiny, tmp_path):
  d, _, _ = tiny
  args = ("benchmark_preferences.py", f"--out={tmp_path}", f"--model={d}", "--users=3", "--prompts=3",
          "--gen_users=1", "--gen_prompts=1", "--best_of=2", "--max_new_tokens=6", "--k=3")
  proc = run_launch(*args, "--pair_counts=2,4", check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| 2 |" in proc.stdout and "Best-of-2" in proc.stdout and "reusing" not in proc.stdout
  report = json.load(open(tmp_path / "preferences.json"))
  assert set(report["accuracy"]) == {"drift", "logistic", "chance"}
  assert (tmp_path / "preferences.png").is_file() and (tmp_path / "preferences.md").is_file()
  # Another pair count reuses the scored pool, and the counts both runs share give the same accuracies.
  again = run_launch(*args, "--pair_counts=2")
  assert "reusing the scored pool" in again.stdout
  second = json.load(open(tmp_path / "preferences.json"))
  assert second["accuracy"]["drift"]["2"] == report["accuracy"]["drift"]["2"]
  # Other settings score again.
  assert "scoring again" in run_launch(*args, "--pair_counts=2", "--max_new_tokens=5").stdout
