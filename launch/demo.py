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

import dataclasses
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
common.define_resume_flags()


@dataclasses.dataclass(frozen=True)
class BaseModel:
  """The toy config's `base_model` section: the small Llama trained from scratch as the frozen trunk."""

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  ffn_dim: int
  steps: int
  batch_size: int
  learning_rate: float


def base_model(cfg, workdir, records, split, mesh=None):
  """Trains (once) and reloads the demo's frozen base model and tokenizer."""
  import numpy as np
  from flax import nnx

  import persomux
  from persomux import data as data_lib
  from persomux import run_config, train
  from persomux.models.config import TrunkConfig
  from persomux.models.modeling import Trunk
  from persomux.tokenizer import train_bpe_tokenizer

  path = os.path.join(workdir, "base_model")
  if os.path.isfile(os.path.join(path, "config.json")):
    print(f"base model: reusing {path}")
    return persomux.load_model(path, dtype=cfg.dtype or None, mesh=mesh)
  bm = run_config.section(BaseModel, cfg.extras.get("base_model"), "base_model")
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
  return persomux.load_model(path, dtype=cfg.dtype or None, mesh=mesh)


def make_corpus(cfg) -> list[dict]:
  """The demo's persona population (`corpus_kind`: "personas_en" or "synthetic", with its `corpus` section)."""
  from persomux import personas_en, run_config, synthetic

  kinds = {"synthetic": (synthetic.make_corpus, synthetic.SyntheticCorpusConfig),
           "personas_en": (personas_en.make_corpus, personas_en.PersonaPopulationConfig)}
  kind = cfg.extras.get("corpus_kind")
  if kind not in kinds:
    raise app.UsageError(f"--config.corpus_kind={kind!r}: expected personas_en or synthetic")
  make, section = kinds[kind]
  try:
    return make(run_config.section(section, cfg.extras.get("corpus"), "corpus", dataclasses.asdict(section())))
  except run_config.ConfigError as e:
    raise app.UsageError(str(e)) from e


def main(argv):
  del argv

  from persomux import data as data_lib
  from persomux import evaluation, stages, synthetic, train

  workdir = FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  data_path = os.path.join(workdir, "corpus.jsonl")
  # The demo's own data, and for the toy config its own trunk, both in the workdir.
  cfg = FLAGS.config
  cfg.data.path = data_path
  if cfg.corpus_kind == "synthetic":
    cfg.model_dir = os.path.join(workdir, "base_model")
  cfg = common.run_config(cfg)
  mesh = common.setup(cfg)
  t0 = time.time()
  synthetic.write_jsonl(make_corpus(cfg), data_path)
  records, _ = data_lib.load_records(data_path)
  split = stages.Split.make(records, cfg, workdir)
  print(f"corpus: {len(records)} records, {len(split.pretrain)} pretraining personas, "
        f"{len(split.finetune)} unseen personas")
  try:
    stages.save_run(cfg, workdir, allow_config_change=FLAGS.allow_config_change)
  except train.ConfigChanged as e:
    raise app.UsageError(str(e)) from e

  if cfg.extras.get("corpus_kind") == "synthetic":
    trunk, tokenizer = base_model(cfg, workdir, records, split, mesh)
  else:
    import persomux

    trunk, tokenizer = persomux.load_model(cfg.model_dir, dtype=cfg.dtype or None, mesh=mesh)
    print(f"trunk: {cfg.model_dir} ({trunk.config.family}, {trunk.config.num_layers} layers, "
          f"d={trunk.config.d_model}, vocab {trunk.config.vocab_size}), loaded in {time.time() - t0:.0f} s")

  allow = FLAGS.allow_config_change
  try:
    pre = stages.pretrain(cfg, workdir, trunk, tokenizer, records, mesh=mesh, allow_config_change=allow)
    print(f"stage 1: {pre['classes']} personas, test loss {pre['test_loss']:.4f}")
    # Stage 2 for every method and the LoRA baseline where the config lists it, then the paper's
    # evaluation (reduced: see configs/demo.py), which only measures.
    stages.evaluation_stages(cfg, workdir, trunk, tokenizer, records, methods=evaluation.methods(cfg), mesh=mesh,
                             allow_config_change=allow)
  except train.ConfigChanged as e:
    raise app.UsageError(str(e)) from e
  try:
    embedder = evaluation.load_embedder()
  except ImportError as e:
    print(f"embedding metrics skipped: {e}")
    embedder = None
  evaluation.evaluate_run(cfg, workdir, trunk, tokenizer, records, embedder=embedder, trunk_name=cfg.model_dir)
  with open(os.path.join(workdir, "report.md")) as f:
    print("\n" + f.read())
  print(f"wrote report.md, report.json, loss_curves.png, mixtures.png and bias_sweep.png to {workdir}")
  print(f"demo time: {time.time() - t0:.0f} s")


def run():
  """Console entry point."""
  common.run(main)


if __name__ == "__main__":
  run()
