"""The Colab notebooks: Colab-ready as stored, and every cell runs headless in tiny mode.

Each notebook executes in a fresh kernel (nbclient) with `PERSOMUX_TINY=1`,
from its own temporary directory, so whatever it writes (`runs/...`) stays
there. In tiny mode a notebook builds a toy model instead of installing
persomux and loading a real checkpoint.
"""

import glob
import json
import os
import sys
import time

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
INSTALL = '!pip install -q "persomux[export] @ git+https://github.com/persomux/persomux"'


def _name(path: str) -> str:
  return os.path.basename(path)


@pytest.fixture(scope="session")
def kernel_dir(tmp_path_factory):
  """A `python3` kernel spec that runs this interpreter (the venv's), found before any other."""
  from ipykernel.kernelspec import install

  prefix = tmp_path_factory.mktemp("jupyter")
  install(kernel_name="python3", prefix=str(prefix))
  spec = json.load(open(prefix / "share" / "jupyter" / "kernels" / "python3" / "kernel.json"))
  assert spec["argv"][0] == sys.executable, spec["argv"]
  return str(prefix / "share" / "jupyter")


def test_notebooks_are_stored_colab_ready():
  assert NOTEBOOKS, "no notebooks in notebooks/"
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    meta = nb.metadata
    assert meta["accelerator"] == "GPU" and meta["colab"]["gpuType"] == "T4", path
    assert meta["kernelspec"]["name"] == "python3" and meta["language_info"]["name"] == "python", path
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), path
    assert (f"https://colab.research.google.com/github/persomux/persomux/blob/main/notebooks/{_name(path)}"
            in first.source), f"{path}: the Colab badge must open this notebook"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path}: stored with outputs"
    install = [c for c in code if INSTALL in c.source]
    assert install and "if not TINY:" in install[0].source, f"{path}: the install cell must skip tiny mode"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_name)
def test_notebook_runs_in_tiny_mode(path, tmp_path, monkeypatch, kernel_dir):
  monkeypatch.setenv("PERSOMUX_TINY", "1")
  monkeypatch.setenv("JUPYTER_PATH", kernel_dir)
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # conftest simulates 8 devices; a notebook gets one
  nb = nbformat.read(path, as_version=4)
  # The kernel must be this interpreter, so the notebook imports the persomux under test.
  nb.cells.insert(0, nbformat.v4.new_code_cell(
      f"import sys\nassert sys.prefix == {sys.prefix!r}, sys.executable"))
  client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
  start = time.perf_counter()
  client.execute()  # raises CellExecutionError on the first failing cell
  print(f"{_name(path)}: {time.perf_counter() - start:.1f} s")
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
  assert not errors, errors
  assert os.path.isdir(tmp_path / "runs"), "the notebook should write under its working directory"
