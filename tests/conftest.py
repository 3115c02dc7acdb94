"""Shared test setup: 8 simulated CPU devices, full-precision matmuls, the parity table.

The suite runs on two xdist workers, a test file per worker at a time
(`addopts` in pyproject.toml). Each worker fills its own `PARITY`; they write
it to a shared directory at the end, and the controller prints the table.
"""

import glob
import json
import os
import tempfile

import pytest

# Must precede the first jax import anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

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
