"""Training learns: each claim is checked against a reference computed independently.

- Stage 1 lowers the held-out loss of the pretraining personas below that of
  the frozen trunk scored by transformers (no soft tokens), and below the
  stage-1 bias alone (mixtures zeroed): the per-persona mixtures carry the
  persona.
- Stage 2 (mixtures only, W and b frozen) lowers the held-out loss of unseen
  personas from its start (m_i = 0).
- The spliced soft-prompt loss equals a hand computation in transformers fed
  the same `inputs_embeds`, for Llama, Gemma 2 and Gemma 3 at bias scales
  1, 0.5 and 0 (bias tokens removed).

The corpus is made so that what a persona adds is known: persona i always
answers with its favourite colour, then a filler word drawn uniformly, so with
the persona known the colour costs nothing and without it log 8 nats.
"""

import collections
import json
import os
import random

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM,
                          Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast)

import persomux
from persomux import data as data_lib
from persomux import prompts, stages, train
from persomux.models.config import TrunkConfig
from persomux.models.modeling import Trunk
from configs import tiny

COLOURS = ("red", "green", "blue", "gold", "pink", "grey", "teal", "plum")
# Cue words name a colour in the base model's corpus (e.g. "sky blue"): a real
# LLM can tell colours apart, and so must the tiny trunk, or no prompt could
# steer it. In persona replies the colours are exchangeable, so trained on
# those alone its output embeddings of the colours stay nearly equal.
CUES = ("ruby", "leaf", "sky", "sun", "rose", "ash", "sea", "jam")
FILLERS = ("so", "yes", "well", "indeed")
NUM_PERSONAS = 16  # persona i's favourite colour is COLOURS[i % 8]
EXAMPLES_PER_PERSONA = 16  # 12 train + 4 test
# Held-out personas: unseen classes, each sharing its colour with one pretraining persona.
FINETUNE = (1, 4, 6, 15)


def persona_name(i: int) -> str:
  return f"persona_{i:02d}"


def persona_records(personas, per_persona: int, seed: int) -> list[data_lib.Record]:
  """Replies "<favourite colour> <filler>", no context and no text persona."""
  rng = random.Random(seed)
  return [data_lib.Record(persona_name(i), f"{COLOURS[i % 8]} {rng.choice(FILLERS)}")
          for i in personas for _ in range(per_persona)]


def word_tokenizer():
  """One token per word; `<bos>` is added in front, like Llama and Gemma tokenizers do."""
  words = ["<pad>", "<bos>", "<eos>", "<unk>", *COLOURS, *CUES, *FILLERS]
  tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
  return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                 unk_token="<unk>")


def run_config(model_dir: str):
  c = tiny.get_config()
  c.model_dir = model_dir
  c.data.use_chat_template = "no"
  c.data.max_len = 16
  c.data.test_fraction = 0.25
  # Codes initialised at about the scale of the trunk's token embeddings:
  # from 0.02 the bilinear m·W stays near its saddle for long enough that a
  # persona or two is still unlearned after a CPU-sized budget.
  c.prompt.num_codes = 16
  c.prompt.init_std = 0.3
  c.pretrain.batch_size = 0  # set to the full batch below
  c.pretrain.warmup_epochs = 10
  c.pretrain.epochs = 60
  c.pretrain.learning_rate = 3e-2
  c.pretrain.checkpoint_every = 1000
  c.pretrain.eval_every = 0
  c.finetune.batch_size = 0  # full batch, as in the paper
  c.finetune.steps = 60
  c.finetune.learning_rate = 1e-1
  c.finetune.checkpoint_every = 1000
  c.finetune.eval_every = 0
  return c


def train_base_model(tokenizer, path: str):
  """A tiny Llama trained on the population (fresh replies of every persona, the
  persona unseen) plus cue bigrams; saved with save_model and reloaded."""
  rng = random.Random(1)
  texts = [r.text for r in persona_records(range(NUM_PERSONAS), 32, seed=1)]
  texts += [f"{CUES[c]} {COLOURS[c]} {rng.choice(FILLERS)}" for c in (rng.randrange(8) for _ in range(512))]
  fmt = data_lib.PromptFormatter(tokenizer, "{persona}{soft}\n{context}\n", "no")
  examples = data_lib.encode([data_lib.Record("population", t) for t in texts], fmt,
                             data_lib.ClassVocab(["population"]), 16)
  cfg = TrunkConfig.llama(vocab_size=len(tokenizer), d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          ffn_dim=64, tie_embeddings=True, max_position_embeddings=64,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
  model = Trunk(cfg, rngs=nnx.Rngs(0))
  src = data_lib.ShuffledBatches(examples, 32, seed=0, buckets=(8,), drop_last=True)
  train.train_language_model(model, src, 200, train.OptimConfig(learning_rate=1e-2), progress=False)
  persomux.save_model(model, tokenizer, path)


def hf_class_losses(model_dir: str, examples) -> dict[int, float]:
  """Token-mean NLL of the targets per class id, by transformers' PyTorch model, no soft tokens."""
  hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
  sums, counts = collections.Counter(), collections.Counter()
  for e in examples:
    ids = np.concatenate([e.prefix, e.suffix, e.target])
    with torch.no_grad():
      logp = torch.log_softmax(hf(input_ids=torch.tensor(ids[None])).logits[0].float(), -1).numpy()
    first = len(e.prefix) + len(e.suffix)  # >= 1: BOS is never a target
    t = np.arange(first, len(ids))
    sums[e.class_id] -= float(logp[t - 1, ids[t]].sum())
    counts[e.class_id] += len(t)
  return {c: sums[c] / counts[c] for c in counts}


def eval_batches(examples, cfg):
  """Batches shaped like the stages' own test batches, so their compiled loss is reused."""
  return data_lib.ShuffledBatches(examples, cfg.pretrain.batch_size, buckets=data_lib.default_buckets(cfg.data.max_len),
                                  shuffle=False).all_batches()


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("learning")
  model_dir, workdir = str(tmp / "base_model"), str(tmp / "run")
  train_base_model(word_tokenizer(), model_dir)
  trunk, tok = persomux.load_model(model_dir, dtype="float32")
  records = persona_records(range(NUM_PERSONAS), EXAMPLES_PER_PERSONA, seed=0)
  pre = [persona_name(i) for i in range(NUM_PERSONAS) if i not in FINETUNE]
  fine = [persona_name(i) for i in FINETUNE]
  # Split.make reads a run's split back from split.json: writing it first fixes
  # which personas are held out.
  os.makedirs(workdir)
  with open(os.path.join(workdir, "split.json"), "w") as f:
    json.dump({"pretrain": pre, "finetune": fine, "personas": {}}, f)
  cfg = run_config(model_dir)
  fmt = stages.formatter_for(tok, cfg)
  tr, te = stages.make_examples(records, pre, fmt, cfg.to_dict(), "max_per_class_pretrain", collections.Counter())
  cfg.pretrain.batch_size = len(tr)
  out = stages.pretrain(cfg, workdir, trunk, tok, records, progress=False)
  return dict(cfg=cfg, workdir=workdir, model_dir=model_dir, trunk=trunk, tok=tok, records=records, pre=pre,
              fine=fine, fmt=fmt, test=te, out=out)


def test_stage1_beats_the_frozen_trunk_and_the_bias_alone(stage1):
  s = stage1
  d = s["trunk"].config.d_model
  trunk_loss = hf_class_losses(s["model_dir"], s["test"])
  batches = eval_batches(s["test"], s["cfg"])
  # The reference scores what persomux scores without soft tokens.
  ours = train.evaluate(s["trunk"], None, batches)["per_class"]
  for c in trunk_loss:
    assert ours[c] == pytest.approx(trunk_loss[c], rel=1e-4)

  prompt, _ = stages.load_prompt(s["workdir"], "pretrain", d)
  full = train.evaluate(s["trunk"], prompt, batches)
  assert full["loss"] == pytest.approx(s["out"]["test_loss"], rel=1e-5)
  prompt.mixtures[...] = jnp.zeros_like(prompt.mixtures[...])
  bias_only = train.evaluate(s["trunk"], prompt, batches)

  mean = lambda per_class: float(np.mean(list(per_class.values())))
  gain = {c: trunk_loss[c] - full["per_class"][c] for c in trunk_loss}
  print(f"\nstage 1 held-out loss: trunk {mean(trunk_loss):.3f}, bias alone {mean(bias_only['per_class']):.3f}, "
        f"persona-mux {mean(full['per_class']):.3f} (colour known: about {np.log(4) / 3:.3f}); "
        f"smallest per-persona gain over the trunk {min(gain.values()):.3f}")
  for c, name in enumerate(s["pre"]):
    assert gain[c] > 0.5, (name, full["per_class"][c], trunk_loss[c])
    # The bias alone may happen to favour one persona's colour, so per persona
    # the mixtures need only not lose; on average they win by far.
    assert full["per_class"][c] < bias_only["per_class"][c] + 0.02, (name, full["per_class"][c],
                                                                      bias_only["per_class"][c])
  assert mean(full["per_class"]) < mean(bias_only["per_class"]) - 0.5


def test_stage2_learns_unseen_personas(stage1):
  s = stage1
  d = s["trunk"].config.d_model
  out = stages.finetune(s["cfg"], s["workdir"], s["trunk"], s["tok"], s["records"], progress=False)
  _, te = stages.make_examples(s["records"], s["fine"], s["fmt"], s["cfg"].to_dict(), "max_per_class_finetune",
                               collections.Counter())
  trunk_loss = hf_class_losses(s["model_dir"], te)
  gain = {c: trunk_loss[c] - out["per_class"][name] for c, name in enumerate(s["fine"])}
  print(f"\nstage 2 held-out loss: trunk {np.mean(list(trunk_loss.values())):.3f}, "
        f"m=0 {out['initial_test_loss']:.3f} -> {out['test_loss']:.3f}; "
        f"smallest per-persona gain over the trunk {min(gain.values()):.3f}")
  assert out["test_loss"] < out["initial_test_loss"] - 0.5
  for c, name in enumerate(s["fine"]):
    assert gain[c] > 0.5, (name, out["per_class"][name], trunk_loss[c])
  # W and b are stage 1's.
  base, _ = stages.load_prompt(s["workdir"], "pretrain", d)
  np.testing.assert_array_equal(np.asarray(out["prompt"].codebook[...]), np.asarray(base.codebook[...]))
  np.testing.assert_array_equal(np.asarray(out["prompt"].bias[...]), np.asarray(base.bias[...]))
  # Not asserted: that the random-codebook ablation learns less with the same
  # budget. It does on average, but not by a margin that holds: with d=32 its 16
  # random codes span half of the space of the one soft token that predicts the
  # colour, so it reaches nearly the same loss (after 60 steps 0.51-0.54 against
  # persona-mux's 0.49-0.50 over four splits), and on one split it was ahead
  # after 10 steps (0.63 against 0.93). The paper's gap needs d >> n.


# --- the loss against a hand computation in transformers --------------------------------------------

VOCAB, D = 64, 64
SMALL = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SMALL)),
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(
        **SMALL, sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0)),
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(
        **SMALL, sliding_window=4, query_pre_attn_scalar=24, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
}
NUM_CLASSES, NUM_CODES, CODE_TOKENS, BIAS_TOKENS = 3, 4, 2, 3
mean_loss = nnx.jit(train.mean_loss)  # one compile per family, not one per eager op


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  """`(hf model, persomux trunk)`: tiny random weights saved by transformers, loaded by persomux."""
  torch.manual_seed(0)
  hf = FAMILIES[request.param]().eval()
  with torch.no_grad():  # weights large enough that the soft tokens move the loss
    for name, p in hf.named_parameters():
      # Llama's norms scale by w, Gemma's by (1 + w).
      p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name and request.param == "llama" else 0.0))
  path = str(tmp_path_factory.mktemp(request.param))
  hf.save_pretrained(path)
  assert os.path.isfile(os.path.join(path, "model.safetensors"))
  trunk, _ = persomux.load_model(path, dtype="float32", tokenizer=False)
  return hf, trunk


def random_prompt(embed_std: float):
  pm = prompts.PersonaMux(NUM_CLASSES, D, num_codes=NUM_CODES, code_tokens=CODE_TOKENS, bias_tokens=BIAS_TOKENS,
                          rngs=nnx.Rngs(0))
  r = np.random.RandomState(1)
  pm.codebook[...] = jnp.asarray(embed_std * r.randn(NUM_CODES, CODE_TOKENS, D), jnp.float32)
  pm.bias[...] = jnp.asarray(embed_std * r.randn(BIAS_TOKENS, D), jnp.float32)
  pm.mixtures[...] = jnp.asarray(r.randn(NUM_CLASSES, NUM_CODES) / np.sqrt(NUM_CODES), jnp.float32)
  return pm


def ragged_examples():
  """Rows of different prefix (BOS + text persona), context and target lengths."""
  r = np.random.RandomState(2)
  ids = lambda n: r.randint(3, VOCAB, n).astype(np.int32)
  shapes = [(1, 5, 4, 0), (4, 2, 6, 1), (3, 0, 2, 2), (2, 7, 3, 1)]  # (prefix, suffix, target, class)
  return [data_lib.Example(np.concatenate([[1], ids(p - 1)]).astype(np.int32), ids(s), ids(t), c)
          for p, s, t, c in shapes]


def hand_loss(hf, examples, codebook, bias, mixtures, bias_scale) -> float:
  """Masked token-mean cross-entropy of the targets, from transformers fed
  `[prefix embeddings, s_i, context + target embeddings]` per row, right padded.

  s_i = (bias_scale * b) ⊕ Σ_j m_ij W_j, or Σ_j m_ij W_j alone at bias scale 0
  (the paper's "no bias": the bias tokens are removed).
  """
  embed = hf.get_input_embeddings()  # Gemma's scales by sqrt(d), as persomux's Trunk.embed does
  rows, targets = [], []
  for e in examples:
    persona = np.tensordot(mixtures[e.class_id], codebook, axes=1)  # [k, d]
    soft = persona if bias_scale == 0.0 else np.concatenate([bias_scale * bias, persona])
    with torch.no_grad():
      pre = embed(torch.tensor(e.prefix, dtype=torch.long))
      rest = embed(torch.tensor(np.concatenate([e.suffix, e.target]), dtype=torch.long))
    rows.append(torch.cat([pre, torch.tensor(soft, dtype=torch.float32), rest]))
    first = len(e.prefix) + len(soft) + len(e.suffix)
    targets.append((np.arange(first, first + len(e.target)), e.target))
  length = max(len(x) for x in rows)
  embeds = torch.zeros(len(rows), length, D)
  mask = torch.zeros(len(rows), length, dtype=torch.long)
  for i, x in enumerate(rows):
    embeds[i, :len(x)] = x
    mask[i, :len(x)] = 1
  with torch.no_grad():
    logp = torch.log_softmax(hf(inputs_embeds=embeds, attention_mask=mask).logits.float(), -1).numpy()
  nll = [-logp[i, pos - 1, tok] for i, (pos, tok) in enumerate(targets)]
  return float(np.concatenate(nll).mean())


@pytest.mark.parametrize("bias_scale", [1.0, 0.5, 0.0])
def test_spliced_loss_equals_transformers_by_hand(family, bias_scale):
  hf, trunk = family
  embed_std = float(hf.get_input_embeddings()(torch.arange(3, VOCAB)).detach().std())
  pm = random_prompt(embed_std)
  examples = ragged_examples()
  # One more row than examples: an all-padding row that must not count.
  batch = {k: jnp.asarray(v) for k, v in data_lib.collate(examples, len(examples) + 1, (32,)).items()}
  ours = float(mean_loss(trunk, pm, batch, bias_scale))
  ref = hand_loss(hf, examples, np.asarray(pm.codebook[...]), np.asarray(pm.bias[...]),
                  np.asarray(pm.mixtures[...]), bias_scale)
  assert ours == pytest.approx(ref, rel=1e-5)
  # The comparison is sharp: the soft tokens move the loss far more than the tolerance.
  without = float(mean_loss(trunk, None, batch))
  print(f" loss {ours:.5f}, hand {ref:.5f}, without soft tokens {without:.5f}", end="")
  assert abs(ours - without) > 1e-3 * abs(ref)
