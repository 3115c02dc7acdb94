"""Shared test setup: 8 simulated CPU devices compiled for speed, a shared compilation cache,
full-precision matmuls, the parity table.

The suite runs on two xdist workers, a test file per worker at a time
(`addopts` in pyproject.toml). Each worker fills its own `PARITY`; they write
it to a shared directory at the end, and the controller prints the table.
"""

import glob
import json
import os
import tempfile

import pytest

# XLA:CPU settings for the launches the tests start: without LLVM optimization and the fusion emitters, a
# tiny trunk's train step compiles in about a tenth of the time (1.3 s, not 18 s); the matmuls, most of a
# real model's run time, are library calls either way. The library's own defaults are untouched.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
# The tests' own process skips LLVM optimization only: with the fusion emitters off too, test_bank's
# in-process stage 1 takes another trajectory, after which one new persona's held-out loss falls by 0.14
# instead of more than 0.5 (opt level 0 alone: 43 s for that test, both flags 36 s, neither 52 s).
# Must precede the first jax import anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8")

from persomux import host  # noqa: E402

# The launches and notebook kernels the tests start get glibc's large blocks on huge pages from the start
# (persomux.host), as a launch run by hand re-executes itself to get them.
os.environ.update(host.huge_pages_env() or {})

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# One persistent compilation cache for the session: the controller makes it (workers inherit the variable),
# every worker and every program shares it, and it goes when the controller exits. Test modules repeat
# many programs (the same tiny trunk's forward, the SmolLM2 prefill) after `_free_compiled_programs`.
COMPILE_CACHE_ENV = "PERSOMUX_TEST_COMPILE_CACHE"
if not os.environ.get(COMPILE_CACHE_ENV):
  import atexit
  import shutil

  os.environ[COMPILE_CACHE_ENV] = tempfile.mkdtemp(prefix="persomux-xla-cache-")
  atexit.register(shutil.rmtree, os.environ[COMPILE_CACHE_ENV], True)
# The same cache, every program kept in it (jax's defaults skip programs compiled in under 1 s), for the
# launches and notebook kernels the tests start.
CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": os.environ[COMPILE_CACHE_ENV], "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
jax.config.update("jax_compilation_cache_dir", CACHE_ENV["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# family/variant -> max |Δlogit| against transformers, filled by the parity tests.
PARITY: dict[str, float] = {}
_PARITY_DIR = "PERSOMUX_TEST_PARITY_DIR"


def pytest_configure(config):
  if not hasattr(config, "workerinput"):  # the controller (or a run without xdist): workers inherit it
    os.environ[_PARITY_DIR] = tempfile.mkdtemp(prefix="persomux-parity-")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops each module's compiled executables once it is done, so a worker's memory stays flat."""
  yield
  jax.clear_caches()


def pytest_sessionfinish(session):
  if PARITY and os.environ.get(_PARITY_DIR):
    worker = getattr(session.config, "workerinput", {}).get("workerid", "main")
    with open(os.path.join(os.environ[_PARITY_DIR], f"{worker}.json"), "w") as f:
      json.dump(PARITY, f)


def pytest_terminal_summary(terminalreporter):
  table = {}
  for path in glob.glob(os.path.join(os.environ.get(_PARITY_DIR, "/nonexistent"), "*.json")):
    with open(path) as f:
      table.update(json.load(f))
  if not table:
    return
  tr = terminalreporter
  tr.section("trunk parity vs transformers (fp32 logits)")
  tr.write_line(f"{'family/variant':<46}{'max |Δlogit|':>14}  {'ok (<1e-4)':>10}")
  for name in sorted(table):
    tr.write_line(f"{name:<46}{table[name]:>14.2e}  {str(table[name] < 1e-4):>10}")
