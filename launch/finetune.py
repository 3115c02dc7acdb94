r"""Stage 2: learn the held-out classes with W and b frozen (only m_i trains).

  python launch/finetune.py --workdir=runs/l3 [--config=configs/llama3_8b_paper.py] [--method=persona_mux]

Uses the trunk, data and class split of the stage-1 run in --workdir (its
run.json) unless --config is given. All new classes train together, full
batch by default, for `finetune.steps` steps; per-class test loss is logged
to WORKDIR/metrics.jsonl and printed.
"""

import json

if __package__:  # imported as launch.finetune: installed, python -m, or a console entry point
  from launch import common  # noqa: F401
else:  # python launch/finetune.py from a checkout (sys.path[0] is launch/)
  import common  # noqa: F401
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file; default: the workdir's run.json.")
flags.DEFINE_string("workdir", None, "The stage-1 run directory.", required=True)
flags.DEFINE_enum("method", "persona_mux", ["persona_mux", "random_codebook", "soft_prompt"],
                  "Which per-class parameters to learn.")
common.define_resume_flags()


def main(argv):
  del argv
  from persomux import param_counts, stages, train

  cfg = common.run_config(FLAGS.config, FLAGS.workdir)
  mesh = common.setup(cfg)
  trunk, tokenizer = stages.load_trunk(cfg, mesh)
  p = cfg.prompt
  print("trainable parameters:", json.dumps(param_counts(
      cfg.model_dir, num_codes=p.num_codes, code_tokens=p.code_tokens, bias_tokens=p.bias_tokens,
      soft_prompt_tokens=p.soft_prompt_tokens)))
  try:
    out = stages.finetune(cfg, FLAGS.workdir, trunk, tokenizer, method=FLAGS.method, mesh=mesh,
                          allow_config_change=FLAGS.allow_config_change)
  except train.ConfigChanged as e:
    raise app.UsageError(str(e)) from e
  print(json.dumps({"method": FLAGS.method, "initial_test_loss": out["initial_test_loss"],
                    "test_loss": out["test_loss"], "per_class": out["per_class"]}, indent=2))


def run():
  """Console entry point."""
  common.run(main)


if __name__ == "__main__":
  run()
