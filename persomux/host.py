"""Host-process memory settings for XLA:CPU runs.

XLA:CPU allocates an execution's temporaries as one block (756 MiB for
`launch/benchmark.py --suite=train`'s step), with glibc's `malloc`. A block
that large is a fresh `mmap`, unmapped again when the step ends, so every
step first-touches every page of it: on a 2-core machine of 2026-12-02 that
step took about 194,000 minor page faults and 0.4 s of kernel time each
(0.9 s in all). `retain_freed_memory` makes glibc serve every allocation from
one heap that it never shrinks, so the next step reuses the same pages: no
faults, a step of 0.7 s.

The launch scripts call it before JAX starts (`launch/common.py`,
`launch/benchmark.py`), where JAX can only run on the CPU: on an accelerator
host the temporaries live in device memory, and a host heap kept at its peak
after loading an 8B checkpoint would only hold on to RAM. A program of one's
own can call it too. `PERSOMUX_HOST_MEMORY=release` keeps glibc's defaults
everywhere; `PERSOMUX_HOST_MEMORY=retain` applies it on accelerator hosts too.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pkgutil
import sys

ENV = "PERSOMUX_HOST_MEMORY"

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied = False


def cpu_only() -> bool:
  """Whether JAX here can only run on the CPU: `JAX_PLATFORMS` says cpu, or it is unset and no
  accelerator plugin (CUDA, ROCm, TPU, or any other PJRT plugin) is installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  if os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS"):
    return False
  if any(importlib.util.find_spec(m) is not None for m in ("jax_plugins", "libtpu")):
    return False
  return not any(m.name.startswith("jax_") and m.name.endswith("_plugin") for m in pkgutil.iter_modules())


def retain_freed_memory(cpu_hosts_only: bool = True) -> bool:
  """Makes glibc's `malloc` keep freed memory for reuse: one arena for every thread, no `mmap`
  for large blocks, and no trimming of the heap. Returns whether it is in effect.

  A no-op (False) off Linux, with another C library, with `PERSOMUX_HOST_MEMORY=release`, and,
  with `cpu_hosts_only` (unless `PERSOMUX_HOST_MEMORY=retain`), where JAX could run on an
  accelerator (`cpu_only`).

  Call it before JAX starts its CPU client (the first computation, or `jax.devices()`): a thread
  that has allocated already keeps its own arena, whose large blocks are still mapped and
  unmapped each time. The process's resident memory then stays at its peak; it is not returned
  to the system until the process ends.
  """
  global _applied
  if _applied:
    return True
  setting = os.environ.get(ENV, "")
  if setting not in ("", "release", "retain"):
    raise ValueError(f"{ENV}={setting!r}: expected release or retain (or unset)")
  if not sys.platform.startswith("linux") or setting == "release":
    return False
  if cpu_hosts_only and setting != "retain" and not cpu_only():
    return False
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # glibc only: musl and others have other knobs
  except (OSError, AttributeError):
    return False
  # Order matters: with one arena first, no thread created afterwards gets an arena of its own
  # (whose heaps are limited to 64 MiB, so its large blocks would be mapped regardless).
  ok = (libc.mallopt(_M_ARENA_MAX, 1) == 1 and libc.mallopt(_M_MMAP_MAX, 0) == 1
        and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1)
  _applied = ok
  return ok
