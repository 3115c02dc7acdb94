r"""Adds new personas to a trained codebook: only their mixtures train (the paper's stage 2).

  python launch/add_personas.py --workdir=runs/demo --data=new_npcs.jsonl --job=npcs
  python launch/add_personas.py --workdir=runs/demo --data=more.jsonl --job=fixes --replace

Every class in --data (JSONL, CSV, Parquet or a directory of them; fields as
for stage 1: `class`, `text`, optional `context` and `persona`) becomes a new
persona. W and b stay frozen and each new persona's mixtures start at zero;
all of the job's personas train together, in one compiled job, with the
run's `finetune` settings (steps, batch size, learning rate) unless --config
is given. Each persona's examples are split into train and test by
`data.test_fraction`; the per-persona test loss before and after is printed
and kept in WORKDIR/personas/JOB.json.

A name already in the run (stage 1, its held-out personas, another job) is an
error that lists the clashes, unless --replace, which trains new personas
under those names. A killed job resumes when rerun; a finished job reports its
results; a job rerun with other data or settings is refused. The personas are
then in `persomux.PersonaBank.load(WORKDIR)`, `launch/serve.py`,
`launch/generate.py` and `launch/export.py`.
"""

import json
import os

if __package__:  # imported as launch.add_personas: installed, python -m, or a console entry point
  from launch import common  # noqa: F401
else:  # python launch/add_personas.py from a checkout (sys.path[0] is launch/)
  import common  # noqa: F401
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file; default: the workdir's run.json.")
flags.DEFINE_string("workdir", None, "The stage-1 run directory (holds the codebook).", required=True)
flags.DEFINE_string("data", None, "Records of the new personas (JSONL, CSV, Parquet, or a directory of them).",
                    required=True)
flags.DEFINE_string("job", None, "The job's name (letters, digits, '_', '.', '-'); default: --data's file name "
                    "without its extension. Rerunning a job resumes it.")
flags.DEFINE_enum("method", "persona_mux", ["persona_mux", "random_codebook", "soft_prompt"],
                  "What the new personas learn: Persona-Mux mixtures (the bank serves these), or an "
                  "ablation for comparison.")
flags.DEFINE_bool("replace", False, "Train new personas under names the run already has; they take the names "
                  "over in the persona bank.")
common.define_resume_flags()


def main(argv):
  del argv
  from persomux import data as data_lib
  from persomux import stages, train

  job = FLAGS.job or os.path.splitext(os.path.basename(os.path.normpath(FLAGS.data)))[0]
  try:
    stages.check_job_name(job)
  except stages.JobError as e:
    raise app.UsageError(f"--job: {e}") from e
  cfg = common.run_config(FLAGS.config, FLAGS.workdir)
  try:  # check the new personas before loading a big trunk
    records, skipped = data_lib.load_records(FLAGS.data)
  except (data_lib.DataError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e
  if skipped:
    print(f"{FLAGS.data}: skipped rows {dict(skipped)}")
  mesh = common.setup(cfg)
  trunk, tokenizer = stages.load_trunk(cfg, mesh)
  try:
    out = stages.add_personas(cfg, FLAGS.workdir, trunk, tokenizer, records, job=job, method=FLAGS.method,
                              replace=FLAGS.replace, source=FLAGS.data, mesh=mesh,
                              allow_config_change=FLAGS.allow_config_change)
  except (data_lib.DataError, stages.JobError, FileNotFoundError, train.ConfigChanged) as e:
    raise app.UsageError(str(e)) from e
  per = out["per_persona"]
  fmt = lambda x: "-" if x is None else f"{x:.4f}"
  print(f"{'persona':<28}{'train':>6}{'test':>6}{'loss before':>13}{'loss after':>12}")
  for name, r in list(per.items())[:50]:
    print(f"{name[:27]:<28}{r['train_examples']:>6}{r['test_examples']:>6}{fmt(r['initial_test_loss']):>13}"
          f"{fmt(r['test_loss']):>12}")
  if len(per) > 50:
    print(f"... and {len(per) - 50} more (WORKDIR/personas/{job}.json)")
  print(json.dumps({"job": job, "method": FLAGS.method, "personas": len(per), "resumed": out.get("resumed"),
                    "initial_test_loss": out["initial_test_loss"], "test_loss": out["test_loss"]}))


def run():
  """Console entry point."""
  common.run(main)


if __name__ == "__main__":
  run()
