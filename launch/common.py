"""Shared setup for the launch scripts: sys.path, distributed init, mesh, logging."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from absl import flags, logging

flags.DEFINE_string("mesh", None, "Device mesh, e.g. data:2,fsdp:2,tensor:2 (default: every device on data).")
flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize(); default: when the environment "
                  "names a coordinator (JAX_COORDINATOR_ADDRESS). On TPU slices, Slurm and Open MPI the "
                  "process layout is detected; elsewhere pass --num_processes and --process_id.")
flags.DEFINE_integer("num_processes", None, "Processes in the job (default: $JAX_NUM_PROCESSES or detected).")
flags.DEFINE_integer("process_id", None, "This process's index (default: $JAX_PROCESS_ID or detected).")


def define_resume_flags():
  """`--allow_config_change`, for the launches that resume a run from its workdir."""
  flags.DEFINE_bool("allow_config_change", False, "Resume a run whose config (run.json, or what a checkpoint "
                    "was written with) differs from this one; without it such a resume is refused with the "
                    "changed fields listed. Fields that only change memory use or logging (micro_batch_size, "
                    "loss_chunk, remat, mesh, checkpoint_every, eval_every) may always change.")


def run_config(config=None, workdir: str | None = None):
  """The typed config (`persomux.run_config.Run`) of `config`, else of the run in `workdir`
  (its run.json); a bad or missing one is a usage error."""
  from absl import app

  from persomux import run_config as rc
  from persomux import stages

  try:
    return rc.view(config if config is not None else stages.load_run(workdir))
  except (rc.ConfigError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from e


def setup(config=None):
  """Initializes multi-host JAX when asked, and returns the mesh."""
  import jax

  FLAGS = flags.FLAGS
  wants = FLAGS.distributed
  if wants is None:
    wants = bool(os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("COORDINATOR_ADDRESS"))
  if wants:
    env_int = lambda k: int(os.environ[k]) if os.environ.get(k) else None
    num = FLAGS.num_processes if FLAGS.num_processes is not None else env_int("JAX_NUM_PROCESSES")
    pid = FLAGS.process_id if FLAGS.process_id is not None else env_int("JAX_PROCESS_ID")
    # CPU devices of different processes need a collectives library (GPU/TPU
    # backends ignore this setting).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(num_processes=num, process_id=pid)
  # Orbax logs every save at INFO; progress bars and printed summaries say enough.
  logging.set_verbosity(logging.WARNING)
  from persomux import sharding

  from persomux import run_config

  spec = FLAGS.mesh if FLAGS.mesh is not None else (run_config.view(config).mesh if config is not None else "")
  mesh = sharding.parse_mesh(spec or None)
  # One device needs no mesh: plain placement skips sharding machinery.
  return mesh if mesh.size > 1 else None


def run(main):
  """Runs an absl `main`, also as a console entry point (`persomux-serve`, ...).

  There `__main__` is pip's wrapper, so absl's help would show neither the
  launch's docstring nor its flags; point both at the launch's own module.
  """
  import inspect

  from absl import app

  from persomux import host

  # Before anything runs: once more with glibc's large blocks on huge pages (persomux.host).
  host.reexec_with_huge_pages()
  module = inspect.getmodule(main)
  if module is not None and module.__name__ != "__main__":
    sys.argv[0] = module.__name__  # absl's --helpshort lists the flags of the module argv[0] names
    sys.modules["__main__"].__doc__ = module.__doc__
  app.run(main)
