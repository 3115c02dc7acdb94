"""persomux.host: a launch runs itself again with glibc's large blocks on transparent huge pages,
so XLA:CPU's per-execution temporaries fault in 2 MiB pages instead of 4 KiB ones. The reference is
the kernel's own count of minor page faults (getrusage) against the temporaries' size in 4 KiB pages."""

import os
import subprocess
import sys

import pytest

from persomux import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A script (re-execution needs one) whose computation has 128 MiB of temporaries ([4096, 4096]
# float32 intermediates, reduced to scalars so the output is small). After `reexec_with_huge_pages`
# it runs it three times, then three more, each counted, and prints its arguments, whether the
# huge-page tunable is set, the fewest page faults of the three counted runs and the temporaries'
# size in 4 KiB pages.
PROBE = r"""
import os, resource, sys
from persomux import host
host.reexec_with_huge_pages()
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
print(" ".join(sys.argv[1:]), "|", host.TUNABLE in os.environ.get("GLIBC_TUNABLES", ""), min(faults), temp // 4096)
"""


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES", host.ENV)}
  return dict(env, **{"PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **extra})


def _probe(tmp_path, **extra):
  script = tmp_path / "probe.py"
  script.write_text(PROBE)
  out = subprocess.run([sys.executable, str(script), "--flag=1", "two words"], env=_clean_env(**extra),
                       capture_output=True, text=True, timeout=300, check=True).stdout
  args, rest = out.strip().rsplit("|", 1)
  tuned, faults, pages = rest.split()
  return args.strip(), tuned == "True", int(faults), int(pages)


@pytest.mark.skipif(host.huge_pages_env(_clean_env()) is None,
                    reason="needs Linux, glibc 2.35 or later and transparent huge pages")
def test_reexecuted_launch_faults_in_huge_pages(tmp_path):
  args, tuned, faults, pages = _probe(tmp_path)
  args_default, tuned_default, faults_default, _ = _probe(tmp_path, PERSOMUX_HOST_MEMORY="default")
  # Run again with the same arguments, and with the tunable; told not to, neither.
  assert args == args_default == "--flag=1 two words"
  assert tuned and not tuned_default
  assert pages >= 32_768  # the temporaries really are 128 MiB
  # glibc's defaults map the temporaries (and the matmul's own buffers) afresh each run, in 4 KiB
  # pages: at least a fault per page of the temporaries (here about a million in all).
  assert faults_default > pages, (faults_default, pages)
  # On huge pages most of those are 2 MiB faults instead (here about 32,000: 34x fewer).
  assert faults < faults_default / 10, (faults, faults_default)


def test_setting_is_checked(monkeypatch):
  monkeypatch.setenv(host.ENV, "sometimes")
  with pytest.raises(ValueError, match="PERSOMUX_HOST_MEMORY='sometimes': expected default or huge"):
    host.huge_pages_env()
  assert host.huge_pages_env(_clean_env(PERSOMUX_HOST_MEMORY="default")) is None
  assert host.huge_pages_env(_clean_env(GLIBC_TUNABLES="glibc.malloc.hugetlb=0")) is None  # the user's own choice


def test_cpu_only_follows_jax_platforms():
  assert not host.cpu_only({"JAX_PLATFORMS": "cuda,cpu"})
  assert host.cpu_only({"JAX_PLATFORMS": "cpu"})
  assert not host.cpu_only({"PJRT_NAMES_AND_LIBRARY_PATHS": "my_chip:/opt/libmy_chip_pjrt.so"})
  if host.huge_pages_env(_clean_env()) is not None:
    assert host.huge_pages_env(_clean_env(JAX_PLATFORMS="tpu")) is None
    assert host.huge_pages_env(_clean_env(JAX_PLATFORMS="tpu", PERSOMUX_HOST_MEMORY="huge")) is not None
