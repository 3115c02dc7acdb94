"""Shared test setup: 8 simulated CPU devices, full-precision matmuls, the parity table."""

import os

# Must precede the first jax import anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# family/variant -> max |Δlogit| against transformers, filled by the parity tests.
PARITY: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter):
  if not PARITY:
    return
  tr = terminalreporter
  tr.section("trunk parity vs transformers (fp32 logits)")
  tr.write_line(f"{'family/variant':<46}{'max |Δlogit|':>14}  {'ok (<1e-4)':>10}")
  for name in sorted(PARITY):
    tr.write_line(f"{name:<46}{PARITY[name]:>14.2e}  {str(PARITY[name] < 1e-4):>10}")
