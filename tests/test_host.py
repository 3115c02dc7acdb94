"""persomux.host: with freed memory retained, XLA:CPU's per-execution temporaries reuse pages the
process already has, instead of faulting in a fresh mapping every run. The reference is the
kernel's own count of minor page faults (getrusage) against the temporaries' size in pages."""

import os
import subprocess
import sys

import pytest

from persomux import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A computation whose temporaries are 128 MiB ([4096, 4096] float32 intermediates, reduced to
# scalars so the output is small), run three times, then three more, each counted; prints the
# fewest page faults of those three and the temporaries' size in 4 KiB pages. (A run may still
# start before the previous one's temporaries are freed, on a loaded machine most of all, and
# then the heap grows once more: seen in CI as 16,385 faults in one run.)
PROBE = r"""
import resource, sys
from persomux import host
applied = host.retain_freed_memory(cpu_hosts_only=False)
import jax, jax.numpy as jnp

@jax.jit
def f(x):
  a = jnp.sin(x[:, None] * x[None, :])
  b = jnp.cos(a) + a
  c = jnp.exp(-b * b) * a
  return (c @ b).sum() + jnp.tanh(c).sum()

x = jnp.linspace(0.0, 1.0, 4096)
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
for _ in range(3):
  f(x).block_until_ready()
faults = []
for _ in range(3):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(applied, min(faults), temp // 4096)
"""


def _probe(setting: str):
  env = dict(os.environ, PERSOMUX_HOST_MEMORY=setting, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300,
                       check=True).stdout.split()
  return out[0] == "True", int(out[1]), int(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_retained_memory_spares_the_page_faults_of_xla_temporaries():
  applied, faults, pages = _probe("retain")
  released, faults_default, _ = _probe("release")
  assert applied and not released
  assert pages >= 32_768  # the temporaries really are 128 MiB
  # glibc's defaults map the temporaries afresh each run: a fault per page touched.
  assert faults_default > pages / 2, (faults_default, pages)
  # Retained: the pages of the earlier runs are reused.
  assert faults < pages / 50, (faults, pages)


def test_setting_is_checked(monkeypatch):
  monkeypatch.setattr(host, "_applied", False)
  monkeypatch.setenv(host.ENV, "sometimes")
  with pytest.raises(ValueError, match="PERSOMUX_HOST_MEMORY='sometimes': expected release or retain"):
    host.retain_freed_memory()
  monkeypatch.setenv(host.ENV, "release")
  assert host.retain_freed_memory() is False


def test_cpu_only_follows_jax_platforms(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not host.cpu_only()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host.cpu_only()
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setenv("PJRT_NAMES_AND_LIBRARY_PATHS", "my_chip:/opt/libmy_chip_pjrt.so")
  assert not host.cpu_only()
