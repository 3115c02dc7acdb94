r"""The embedded demo: Persona-Mux end to end on a synthetic persona population.

  python launch/demo.py --workdir=runs/demo

1. Generates a persona corpus with hidden structure (persomux.synthetic).
2. Trains a small Llama-architecture base model on the pretraining
   personas' text (cached in WORKDIR/base_model, written with save_model and
   reloaded with load_model), then freezes it.
3. Stage 1: pretrains a codebook on ~200 personas.
4. Stage 2: learns 20 unseen personas from 20 examples each with
   persona_mux (mixtures only), random_codebook and soft_prompt; trains
   the LoRA baseline.
5. Runs a reduced version of the paper's evaluation (persomux.evaluation):
   test loss, judge generation loss, discrimination, loss improvement,
   parameters, embedding diversity/fidelity and the bias sweep, for base,
   ICL, LoRA, soft_prompt, random_codebook and persona_mux at full, half and
   no bias. Writes WORKDIR/report.md, report.json and plots, and prints the
   tables.

Every stage resumes from WORKDIR if the run is interrupted.
"""

from __future__ import annotations

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


def main(argv):
  del argv

  from persomux import data as data_lib
  from persomux import evaluation, stages, synthetic

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

  pre = stages.pretrain(cfg, workdir, trunk, tokenizer, records, mesh=mesh)
  print(f"stage 1: {pre['classes']} personas, test loss {pre['test_loss']:.4f}")

  # Stage 2 for every method, the LoRA baseline, and the paper's evaluation (reduced: see configs/demo.py).
  try:
    embedder = evaluation.load_embedder()
  except ImportError as e:
    print(f"embedding metrics skipped: {e}")
    embedder = None
  rep = evaluation.evaluate_run(cfg, workdir, trunk, tokenizer, records, embedder=embedder, mesh=mesh)
  with open(os.path.join(workdir, "report.md")) as f:
    print("\n" + f.read())
  print(f"wrote report.md, report.json, loss_curves.png, mixtures.png and bias_sweep.png to {workdir} "
        f"in {time.time() - t0:.0f} s")
  del rep


if __name__ == "__main__":
  app.run(main)
