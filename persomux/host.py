"""Host-process memory settings for XLA:CPU runs.

XLA:CPU allocates an execution's temporaries as one block (756 MiB for
`launch/benchmark.py --suite=train`'s step), with glibc's `malloc`. A block
that large is a fresh `mmap`, unmapped again when the step ends, so every
step faults in every page of it anew: on the 2-core machine of 2026-12-02
that step took about 194,000 minor page faults of 4 KiB and 0.4 s of kernel
time each (0.9 s in all). With glibc asked to back such blocks with
transparent huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, glibc 2.35
and later) the same step takes about 1,000 faults of 2 MiB.

glibc reads that setting only when a process starts, so the launch scripts
run themselves again with it (`reexec_with_huge_pages`, from
`launch/common.py`'s `run` and `launch/benchmark.py`), before they do
anything, where JAX can only run on the CPU. A program of one's own can set
the variable before Python starts. `PERSOMUX_HOST_MEMORY=default` keeps
glibc's defaults; `PERSOMUX_HOST_MEMORY=huge` asks for huge pages on
accelerator hosts too.

(Keeping freed memory in glibc's heap instead, with `mallopt`, also spares
the faults, but a run may start before the previous one's block is freed,
and the heap then grew by a block at a time to about nine blocks.)
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pkgutil
import sys

ENV = "PERSOMUX_HOST_MEMORY"
TUNABLE = "glibc.malloc.hugetlb=1"
THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def cpu_only(environ=os.environ) -> bool:
  """Whether JAX here can only run on the CPU: `JAX_PLATFORMS` says cpu, or it is unset and no
  accelerator plugin (CUDA, ROCm, TPU, or any other PJRT plugin) is installed."""
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  if environ.get("PJRT_NAMES_AND_LIBRARY_PATHS"):
    return False
  if any(importlib.util.find_spec(m) is not None for m in ("jax_plugins", "libtpu")):
    return False
  return not any(m.name.startswith("jax_") and m.name.endswith("_plugin") for m in pkgutil.iter_modules())


def _glibc_version() -> tuple[int, int] | None:
  try:
    fn = ctypes.CDLL(None).gnu_get_libc_version
  except (OSError, AttributeError):
    return None
  fn.restype = ctypes.c_char_p
  major, minor = fn().decode().split(".")[:2]
  return int(major), int(minor)


def huge_pages_env(environ=os.environ) -> dict | None:
  """`environ` with `GLIBC_TUNABLES` asking glibc's `malloc` for transparent huge pages, or None
  where it already asks, is told not to (`PERSOMUX_HOST_MEMORY=default`), or cannot: not Linux,
  not glibc 2.35 or later, transparent huge pages off, or (unless `PERSOMUX_HOST_MEMORY=huge`)
  an accelerator JAX could use (`cpu_only`)."""
  setting = environ.get(ENV, "")
  if setting not in ("", "default", "huge"):
    raise ValueError(f"{ENV}={setting!r}: expected default or huge (or unset)")
  tunables = environ.get("GLIBC_TUNABLES", "")
  if setting == "default" or "glibc.malloc.hugetlb" in tunables or not sys.platform.startswith("linux"):
    return None
  if (_glibc_version() or (0, 0)) < (2, 35):
    return None
  try:
    with open(THP) as f:
      if "[never]" in f.read():
        return None
  except OSError:
    return None
  if setting != "huge" and not cpu_only(environ):
    return None
  return dict(environ, GLIBC_TUNABLES=":".join(t for t in (tunables, TUNABLE) if t))


def reexec_with_huge_pages() -> None:
  """Runs this program's command line again, from the start, with `huge_pages_env` (once: the new
  process has it); returns where that does not apply. For a program started as a script, a
  module (`-m`) or a console entry point, before it has done anything."""
  argv = getattr(sys, "orig_argv", None)
  if not getattr(sys.modules.get("__main__"), "__file__", None) or not argv:  # not -c, not interactive
    return
  env = huge_pages_env()
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], env)
