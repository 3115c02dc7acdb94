"""Bad checkpoints get clear errors that name the file and what was expected."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.numpy import load_file, save_file

import persomux
from persomux.models.config import ConfigError
from persomux.models.params import CheckpointError
from tests.test_trunk_models import build


@pytest.fixture(scope="module")
def good(tmp_path_factory):
  d = tmp_path_factory.mktemp("good")
  build("llama/gqa", str(d))
  return d


def _copy(good, tmp_path):
  d = tmp_path / "ckpt"
  shutil.copytree(good, d)
  return d


def test_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope: no such model directory"):
    persomux.load_model(str(tmp_path / "nope"))


def test_missing_config(good, tmp_path):
  d = _copy(good, tmp_path)
  os.remove(d / "config.json")
  with pytest.raises(FileNotFoundError, match=r"config\.json: missing"):
    persomux.load_model(str(d))


def test_unsupported_model_type_lists_supported(good, tmp_path):
  d = _copy(good, tmp_path)
  cfg = json.load(open(d / "config.json"))
  cfg["model_type"] = "gpt2"
  json.dump(cfg, open(d / "config.json", "w"))
  with pytest.raises(ConfigError, match=r"config\.json: field 'model_type' is 'gpt2'; persomux supports "
                     r"llama, gemma, gemma2, gemma3_text, gemma3"):
    persomux.load_model(str(d))


def test_pickle_only_weights_are_refused(good, tmp_path):
  d = _copy(good, tmp_path)
  os.remove(d / "model.safetensors")
  (d / "pytorch_model.bin").write_bytes(b"not unpickled")
  (d / "model.pt").write_bytes(b"never")
  with pytest.raises(CheckpointError, match=r"holds only pickle weights \(model\.pt, pytorch_model\.bin\); "
                     "persomux loads safetensors only and never unpickles"):
    persomux.load_model(str(d))


def test_missing_tensor(good, tmp_path):
  d = _copy(good, tmp_path)
  tensors = load_file(str(d / "model.safetensors"))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, str(d / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
    persomux.load_model(str(d))


def test_wrong_shape(good, tmp_path):
  d = _copy(good, tmp_path)
  tensors = load_file(str(d / "model.safetensors"))
  tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:16]
  save_file(tensors, str(d / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj"
                     r"\.weight' has shape \(16, 64\), expected \(32, 64\) from config\.json"):
    persomux.load_model(str(d))


def test_index_names_missing_shard(tmp_path):
  d = tmp_path / "sharded"
  build("llama/sharded", str(d))
  index = json.load(open(d / "model.safetensors.index.json"))
  shard = sorted(set(index["weight_map"].values()))[-1]
  os.remove(d / shard)
  with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json: names shard '{shard}', "
                     "which is missing"):
    persomux.load_model(str(d))


def test_not_a_safetensors_file(good, tmp_path):
  d = _copy(good, tmp_path)
  (d / "model.safetensors").write_bytes(b"\xff" * 4)
  with pytest.raises(CheckpointError, match="model.safetensors: not a safetensors file"):
    persomux.load_model(str(d))


def test_import_persomux_does_not_import_torch():
  code = ("import sys, persomux; persomux.load_model; import persomux.train, persomux.sampling, "
          "persomux.stages; assert 'torch' not in sys.modules, 'torch imported'")
  subprocess.run([sys.executable, "-c", code], check=True)
