r"""The embedded demo: Persona-Mux end to end on a synthetic persona population.

  python launch/demo.py --workdir=runs/demo

1. Generates a persona corpus with hidden structure (persomux.synthetic).
2. Trains a small Llama-architecture base model on the pretraining
   personas' text (cached in WORKDIR/base_model, written with save_model and
   reloaded with load_model), then freezes it.
3. Stage 1: pretrains a codebook on ~200 personas.
4. Stage 2: learns 20 unseen personas from 20 examples each with
   persona_mux (mixtures only), random_codebook and soft_prompt.
5. Compares test loss on the same held-out examples of the unseen
   personas, for base (no soft prompt), soft_prompt, random_codebook and
   persona_mux at full, half and no bias; shows sample generations.
   Writes WORKDIR/results.json.

Every stage resumes from WORKDIR if the run is interrupted.
"""

from __future__ import annotations

import json
import os
import time

import common  # noqa: F401  (sys.path, --mesh, --distributed)
from absl import app, flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", os.path.join(_HERE, "..", "configs", "demo.py"),
                                "Demo config file.")
flags.DEFINE_string("workdir", "runs/demo", "Where the base model, checkpoints and results go.")


def base_model(cfg, workdir, records, split, mesh=None):
  """Trains (once) and reloads the demo's frozen base model and tokenizer."""
  import numpy as np
  from flax import nnx

  import persomux
  from persomux import data as data_lib
  from persomux import train
  from persomux.models.config import TrunkConfig
  from persomux.models.modeling import Trunk
  from persomux.tokenizer import train_bpe_tokenizer

  path = os.path.join(workdir, "base_model")
  if os.path.isfile(os.path.join(path, "config.json")):
    print(f"base model: reusing {path}")
    return persomux.load_model(path, dtype=cfg.dtype, mesh=mesh)
  bm = cfg.base_model
  seen = set(split.pretrain)
  texts = [f"{r.context}\n{r.text}" for r in records if r.cls in seen]
  tokenizer = train_bpe_tokenizer(texts, vocab_size=bm.vocab_size)
  tcfg = TrunkConfig.llama(vocab_size=len(tokenizer), d_model=bm.d_model, num_layers=bm.num_layers,
                           num_heads=bm.num_heads, num_kv_heads=bm.num_kv_heads, ffn_dim=bm.ffn_dim,
                           tie_embeddings=True, max_position_embeddings=512,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
  model = Trunk(tcfg, rngs=nnx.Rngs(cfg.seed))
  # The base model sees the same prompt layout as the soft-prompted runs,
  # without soft tokens, and learns every token after BOS.
  fmt = data_lib.PromptFormatter(tokenizer, cfg.data.template, "no")
  examples = []
  for r in records:
    if r.cls in seen:
      pre, suf, tgt = fmt.pieces(None, r.context, r.text)
      examples.append(data_lib.Example(np.asarray(pre[:1], np.int32), np.zeros(0, np.int32),
                                       np.asarray(pre[1:] + suf + tgt, np.int32)[:cfg.data.max_len], 0))
  src = data_lib.ShuffledBatches(examples, bm.batch_size, seed=cfg.seed,
                                 buckets=data_lib.default_buckets(cfg.data.max_len),
                                 pad_id=tokenizer.pad_token_id, drop_last=True)
  losses = train.train_language_model(model, src, bm.steps, train.OptimConfig(
      learning_rate=bm.learning_rate, schedule="cosine", warmup_steps=50))
  print(f"base model: LM loss {losses[0]:.3f} -> {np.mean(losses[-20:]):.3f} over {bm.steps} steps")
  persomux.save_model(model, tokenizer, path)
  return persomux.load_model(path, dtype=cfg.dtype, mesh=mesh)


def samples(cfg, trunk, tokenizer, prompts_by_method, split, fine_examples_ctx):
  """Greedy generations for a few unseen personas, per method."""
  from persomux import data as data_lib
  from persomux import sampling

  fmt = data_lib.PromptFormatter(tokenizer, cfg.data.template, "no")
  out = []
  for ci, (persona, context) in enumerate(fine_examples_ctx[:cfg.samples.personas]):
    cid = split.finetune.index(persona)
    pre, suf = fmt.prompt_pieces(None, context)
    row = {"persona": persona, "context": context, "generations": {}}
    for name, (module, scale) in prompts_by_method.items():
      soft = None if module is None else sampling.SoftPrompts(module, [cid], scale)
      row["generations"][name] = sampling.generate_rows(
          trunk, tokenizer, [(pre + suf, len(pre))], max_new_tokens=cfg.samples.max_new_tokens,
          soft_prompts=soft)[0]
    out.append(row)
  return out


def main(argv):
  del argv

  from persomux import data as data_lib
  from persomux import stages, synthetic, train

  cfg = FLAGS.config
  workdir = FLAGS.workdir
  mesh = common.setup(cfg)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  cc = cfg.corpus
  corpus = synthetic.make_corpus(synthetic.SyntheticCorpusConfig(
      num_personas=cc.num_personas, examples_per_persona=cc.examples_per_persona, seed=cc.seed,
      style_strength=cc.style_strength))
  data_path = os.path.join(workdir, "corpus.jsonl")
  synthetic.write_jsonl(corpus, data_path)
  cfg.data.path = data_path
  records, _ = data_lib.load_records(data_path)
  split = stages.Split.make(records, cfg.to_dict(), workdir)
  print(f"corpus: {len(records)} records, {len(split.pretrain)} pretraining personas, "
        f"{len(split.finetune)} unseen personas")

  trunk, tokenizer = base_model(cfg, workdir, records, split, mesh)
  cfg.model_dir = os.path.join(workdir, "base_model")
  stages.save_run(cfg, workdir)
  counts = {m: v for m, v in _param_counts(cfg).items()}

  pre = stages.pretrain(cfg, workdir, trunk, tokenizer, records, mesh=mesh)
  print(f"stage 1: {pre['classes']} personas, test loss {pre['test_loss']:.4f}")
  results = {}
  for method in ("persona_mux", "random_codebook", "soft_prompt"):
    results[method] = stages.finetune(cfg, workdir, trunk, tokenizer, records, method=method, mesh=mesh)
    r = results[method]
    print(f"stage 2 [{method}]: test loss {r['initial_test_loss']:.4f} -> {r['test_loss']:.4f}")

  test_batches = results["persona_mux"]["test_batches"]
  pm = results["persona_mux"]["prompt"]
  evals = {
      "base": train.evaluate(trunk, None, test_batches),
      "soft_prompt": train.evaluate(trunk, results["soft_prompt"]["prompt"], test_batches),
      "random_codebook": train.evaluate(trunk, results["random_codebook"]["prompt"], test_batches),
      "persona_mux": train.evaluate(trunk, pm, test_batches, 1.0),
      "persona_mux_half_bias": train.evaluate(trunk, pm, test_batches, 0.5),
      "persona_mux_no_bias": train.evaluate(trunk, pm, test_batches, 0.0),
  }
  param_of = {"base": (0, 0), "soft_prompt": counts["soft_prompt"],
              "random_codebook": counts["random_codebook"]}
  for m in ("persona_mux", "persona_mux_half_bias", "persona_mux_no_bias"):
    param_of[m] = counts["persona_mux"]
  methods = {name: {"test_loss": float(ev["loss"]), "params_per_class": int(param_of[name][1]),
                    "params_global": int(param_of[name][0])} for name, ev in evals.items()}

  contexts = []
  for r in records:
    if r.cls in split.finetune and r.cls not in [c for c, _ in contexts]:
      contexts.append((r.cls, r.context))
  by_method = {"base": (None, 1.0), "soft_prompt": (results["soft_prompt"]["prompt"], 1.0),
               "persona_mux": (pm, 1.0), "persona_mux_half_bias": (pm, 0.5), "persona_mux_no_bias": (pm, 0.0)}
  sample_rows = samples(cfg, trunk, tokenizer, by_method, split, contexts)

  out = {"unseen_personas": split.finetune, "methods": methods, "samples": sample_rows,
         "stage1_test_loss": pre["test_loss"], "seconds": round(time.time() - t0, 1)}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(out, f, indent=2)
  print(f"\nTest loss on held-out examples of {len(split.finetune)} unseen personas "
        f"({evals['base']['tokens']} target tokens):")
  print(f"{'method':<24}{'test loss':>10}{'params/class':>14}{'global params':>15}")
  for name, m in methods.items():
    print(f"{name:<24}{m['test_loss']:>10.4f}{m['params_per_class']:>14,}{m['params_global']:>15,}")
  for row in sample_rows:
    print(f"\n{row['persona']} | {row['context']}")
    for name, text in row["generations"].items():
      print(f"  {name:<22} {text!r}")
  print(f"\nwrote {os.path.join(workdir, 'results.json')} in {out['seconds']} s")


def _param_counts(cfg):
  from persomux import prompts as prompts_lib

  p = cfg.prompt
  return {m: (v["global"], v["per_class"]) for m, v in prompts_lib.param_counts(
      os.path.join(cfg.model_dir, "config.json"), num_codes=p.num_codes, code_tokens=p.code_tokens,
      bias_tokens=p.bias_tokens, soft_prompt_tokens=p.soft_prompt_tokens).items()}


if __name__ == "__main__":
  app.run(main)
