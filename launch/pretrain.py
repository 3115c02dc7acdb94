r"""Stage 1: codebook pretraining on the pretraining classes.

  python launch/pretrain.py --config=configs/llama3_8b_paper.py --workdir=runs/l3 \
      --config.model_dir=/path/to/hf_checkpoint --config.data.path=records.jsonl

A bias-only warmup epoch (W and m_i frozen, m_i = 0), then W, b and every
m_i jointly. Splits the data by class (90/10 of the data by default) and
writes the split to WORKDIR/split.json for stage 2. Restarting with the same
--workdir resumes from the last checkpoint.
"""

import json

if __package__:  # imported as launch.pretrain: installed, python -m, or a console entry point
  from launch import common  # noqa: F401  (sys.path, shared flags)
else:  # python launch/pretrain.py from a checkout (sys.path[0] is launch/)
  import common  # noqa: F401  (sys.path, shared flags)
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/llama3_8b_paper.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, prompt state).", required=True)
flags.DEFINE_enum("method", "persona_mux", ["persona_mux", "random_codebook", "soft_prompt"],
                  "Prompt parameterization to pretrain.")
common.define_resume_flags()


def main(argv):
  del argv
  from persomux import param_counts, stages, train

  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/tiny.py")
  cfg = common.run_config(FLAGS.config)
  mesh = common.setup(cfg)  # first: multi-host initialization precedes any other JAX call
  try:
    stages.save_run(cfg, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change)
  except train.ConfigChanged as e:
    raise app.UsageError(str(e)) from e
  trunk, tokenizer = stages.load_trunk(cfg, mesh)
  p = cfg.prompt
  counts = param_counts(cfg.model_dir, num_codes=p.num_codes, code_tokens=p.code_tokens,
                        bias_tokens=p.bias_tokens, soft_prompt_tokens=p.soft_prompt_tokens)
  print("trainable parameters:", json.dumps(counts))
  try:
    out = stages.pretrain(cfg, FLAGS.workdir, trunk, tokenizer, method=FLAGS.method, mesh=mesh,
                          allow_config_change=FLAGS.allow_config_change)
  except train.ConfigChanged as e:
    raise app.UsageError(str(e)) from e
  print(json.dumps({k: out[k] for k in ("test_loss", "classes", "train_examples", "test_examples",
                                         "final_loss", "steps", "truncated")}, indent=2))


def run():
  """Console entry point."""
  common.run(main)


if __name__ == "__main__":
  run()
