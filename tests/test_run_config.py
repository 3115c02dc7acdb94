"""Typed config views: every config file builds one, unknown keys are errors that name the section and
the known keys, old run.json files load with today's defaults, and a run refuses a changed config."""

import dataclasses
import glob
import importlib
import json
import os

import pytest

from configs import base
from persomux import run_config, stages, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                                        if not p.endswith("__init__.py")))
def test_every_config_file_builds_a_view_that_round_trips(name):
  cfg = importlib.import_module(f"configs.{name}").get_config()
  view = run_config.view(cfg)
  assert view.data.max_len == cfg.data.max_len and view.finetune.steps == cfg.finetune.steps
  assert run_config.view(view.to_dict()) == view  # run.json -> view -> run.json
  assert run_config.view(json.loads(json.dumps(view.to_dict()))) == view
  assert set(view.to_dict()) == set(cfg.to_dict())


def test_base_defines_exactly_the_typed_fields():
  """configs/base.py is the source of defaults: it has every field of every section and no other."""
  d = base.get_config().to_dict()
  view = run_config.view({})
  for f in dataclasses.fields(run_config.Run):
    if f.name == "extras":
      continue
    v = getattr(view, f.name)
    if dataclasses.is_dataclass(v):
      assert set(d[f.name]) == {g.name for g in dataclasses.fields(v)}, f.name
      assert dataclasses.asdict(v) == d[f.name]
    else:
      assert v == d[f.name]
  assert set(d) == {f.name for f in dataclasses.fields(run_config.Run)} - {"extras"}


def test_unknown_keys_are_errors_that_list_the_known_ones():
  with pytest.raises(run_config.ConfigError, match=r"config section 'finetune': unknown key 'learnig_rate'; "
                     r"known keys: batch_size, micro_batch_size, learning_rate, .*, steps$"):
    run_config.view({"finetune": {"learnig_rate": 0.1}})
  with pytest.raises(run_config.ConfigError, match=r"unknown key 'b' \(and 'c'\)"):
    run_config.view({"prompt": {"b": 1, "c": 2}})
  with pytest.raises(run_config.ConfigError, match=r"unknown top-level key 'lr'; known keys: model_dir, .*"):
    run_config.view({"lr": 1e-3})
  with pytest.raises(run_config.ConfigError, match=r"config finetune\.steps is 2\.5; expected int"):
    run_config.view({"finetune": {"steps": 2.5}})
  with pytest.raises(run_config.ConfigError, match=r"config section 'data' is 'x.jsonl'; expected a mapping"):
    run_config.view({"data": "x.jsonl"})
  # The optimizer section no longer drops what it does not know.
  assert run_config.view({"pretrain": {"mixture_lr_scale": 10}}).pretrain.optim().mixture_lr_scale == 10.0


def test_an_old_run_json_loads_with_todays_defaults():
  """A run.json written before loss_chunk, micro_batch_size and the lora/eval sections existed."""
  old = base.get_config().to_dict()
  del old["loss_chunk"], old["lora"], old["eval"]
  for section in ("pretrain", "finetune"):
    del old[section]["micro_batch_size"]
  old["pretrain"]["learning_rate"] = 0.05
  view = run_config.view(old)
  assert view.loss_chunk == base.get_config().loss_chunk and view.finetune.micro_batch_size == 0
  assert view.lora.rank == 8 and view.eval.method_list[0] == "base"
  assert view.pretrain.learning_rate == 0.05


def test_save_run_refuses_another_config_unless_allowed(tmp_path):
  cfg = base.get_config()
  cfg.model_dir = "m"
  stages.save_run(cfg, str(tmp_path))
  stages.save_run(cfg, str(tmp_path))  # the same config: fine
  cfg.eval.max_new_tokens = 3  # evaluation settings may change
  cfg.finetune.micro_batch_size = 4  # and so may what only changes memory use
  stages.save_run(cfg, str(tmp_path))
  cfg.pretrain.learning_rate = 0.5
  cfg.model_dir = "other"
  with pytest.raises(train.ConfigChanged, match=r"run\.json: this run was started with another config; changed: "
                     r"model_dir: 'm' -> 'other'; pretrain\.learning_rate: 0\.001 -> 0\.5\. .*--allow_config_change"):
    stages.save_run(cfg, str(tmp_path))
  assert json.load(open(tmp_path / "run.json"))["model_dir"] == "m"  # untouched
  stages.save_run(cfg, str(tmp_path), allow_config_change=True)
  assert run_config.view(stages.load_run(str(tmp_path))).pretrain.learning_rate == 0.5
