r"""The embedded demo: Persona-Mux end to end on a real instruct model.

  python launch/demo.py --workdir=runs/demo                                  # SmolLM2-135M-Instruct
  python launch/demo.py --workdir=runs/toy --config=configs/demo_toy.py      # toy trunk, for quick checks

1. Generates a seeded persona population with hidden styles: natural English
   replies to user messages (persomux.personas_en), or the toy-vocabulary
   population (persomux.synthetic) with `corpus_kind="synthetic"`.
2. Loads the frozen trunk: `model_dir` (the shipped SmolLM2-135M-Instruct
   GGUF by default). The toy config instead trains a small base model on the
   pretraining personas' text (cached in WORKDIR/base_model).
3. Stage 1: pretrains a codebook on the pretraining personas.
4. Stage 2: learns the unseen personas with persona_mux (mixtures only),
   random_codebook and soft_prompt (and the LoRA baseline where the config
   lists it).
5. Runs a reduced version of the paper's evaluation (persomux.evaluation) and
   prints WORKDIR/report.md (also report.json and plots), with each method's
   replies for two unseen personas to the same message.

Every stage resumes from WORKDIR if the run is interrupted.
"""

from __future__ import annotations

import os
import time

if __package__:  # imported as launch.demo: installed, python -m, or a console entry point
  from launch import common  # noqa: F401  (sys.path, --mesh, --distributed)
else:  # python launch/demo.py from a checkout (sys.path[0] is launch/)
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


def make_corpus(cfg) -> list[dict]:
  """The demo's persona population (`cfg.corpus_kind`: "personas_en" or "synthetic")."""
  from persomux import personas_en, synthetic

  cc = cfg.corpus.to_dict()
  if cfg.corpus_kind == "synthetic":
    return synthetic.make_corpus(synthetic.SyntheticCorpusConfig(**cc))
  if cfg.corpus_kind == "personas_en":
    return personas_en.make_corpus(personas_en.PersonaPopulationConfig(**cc))
  raise app.UsageError(f"--config.corpus_kind={cfg.corpus_kind!r}: expected personas_en or synthetic")


def main(argv):
  del argv

  from persomux import data as data_lib
  from persomux import evaluation, stages, synthetic

  cfg = FLAGS.config
  workdir = FLAGS.workdir
  mesh = common.setup(cfg)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  data_path = os.path.join(workdir, "corpus.jsonl")
  synthetic.write_jsonl(make_corpus(cfg), data_path)
  cfg.data.path = data_path
  records, _ = data_lib.load_records(data_path)
  split = stages.Split.make(records, cfg.to_dict(), workdir)
  print(f"corpus: {len(records)} records, {len(split.pretrain)} pretraining personas, "
        f"{len(split.finetune)} unseen personas")

  if cfg.corpus_kind == "synthetic":
    trunk, tokenizer = base_model(cfg, workdir, records, split, mesh)
    cfg.model_dir = os.path.join(workdir, "base_model")
  else:
    import persomux

    trunk, tokenizer = persomux.load_model(cfg.model_dir, dtype=cfg.dtype or None, mesh=mesh)
    print(f"trunk: {cfg.model_dir} ({trunk.config.family}, {trunk.config.num_layers} layers, "
          f"d={trunk.config.d_model}, vocab {trunk.config.vocab_size}), loaded in {time.time() - t0:.0f} s")
  stages.save_run(cfg, workdir)

  pre = stages.pretrain(cfg, workdir, trunk, tokenizer, records, mesh=mesh)
  print(f"stage 1: {pre['classes']} personas, test loss {pre['test_loss']:.4f}")

  # Stage 2 for every method, the LoRA baseline, and the paper's evaluation (reduced: see configs/demo.py).
  try:
    embedder = evaluation.load_embedder()
  except ImportError as e:
    print(f"embedding metrics skipped: {e}")
    embedder = None
  rep = evaluation.evaluate_run(cfg, workdir, trunk, tokenizer, records, embedder=embedder, mesh=mesh,
                                trunk_name=cfg.model_dir)
  with open(os.path.join(workdir, "report.md")) as f:
    print("\n" + f.read())
  print(f"wrote report.md, report.json, loss_curves.png, mixtures.png and bias_sweep.png to {workdir}")
  print(f"demo time: {time.time() - t0:.0f} s")
  del rep


def run():
  """Console entry point."""
  common.run(main)


if __name__ == "__main__":
  run()
