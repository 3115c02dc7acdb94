"""Writes Persona-Mux state for PyTorch users; needs neither torch nor peft.

- `write_peft_prompt(...)`: one persona's soft prompt s_i (bias scaled) as a
  PEFT prompt-tuning adapter (`adapter_config.json` + `adapter_model.safetensors`
  with `prompt_embeddings` [l + k, d]); PEFT prepends it to the input.
- `write_peft_lora(...)`: the LoRA baseline's adapters attached to a trunk as
  a PEFT LoRA adapter (`lora_A` [r, in], `lora_B` [out, r] per target).
- `write_state(...)`: the whole state as `persona_mux.safetensors` with
  `codebook` [n, k, d], `bias` [l, d], `mixtures` [classes, n], and the class
  names and config as JSON metadata (read by `torch_prompts`).
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from persomux.models.params import write_safetensors

STATE_FILE = "persona_mux.safetensors"


def soft_prompt(prompt, class_id: int, bias_scale: float = 1.0) -> np.ndarray:
  """The soft tokens of one class: `[l + k, d]` (`[k, d]` when bias_scale is 0), float32."""
  soft, n = prompt(jnp.asarray([class_id], jnp.int32), bias_scale)
  return np.asarray(soft[0, :int(n[0])], np.float32)


def write_peft_prompt(out_dir: str, soft: np.ndarray, trunk_config, base_model: str | None = None) -> None:
  os.makedirs(out_dir, exist_ok=True)
  config = {
      "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": int(soft.shape[0]),
      "token_dim": int(soft.shape[1]), "num_transformer_submodules": 1,
      "num_attention_heads": trunk_config.num_heads, "num_layers": trunk_config.num_layers,
      "prompt_tuning_init": "RANDOM", "inference_mode": True, "base_model_name_or_path": base_model,
  }
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"),
                    {"prompt_embeddings": np.ascontiguousarray(soft, np.float32)})


def write_peft_lora(out_dir: str, trunk, lora_config, base_model: str | None = None) -> None:
  """Writes the adapters attached to `trunk` (see `persomux.models.lora`) for `peft.PeftModel.from_pretrained`."""
  from persomux.models import lora as lora_lib

  tensors = lora_lib.peft_tensors(trunk)
  os.makedirs(out_dir, exist_ok=True)
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_config.rank, "lora_alpha": lora_config.alpha,
      "target_modules": sorted(lora_config.targets), "lora_dropout": 0.0, "bias": "none",
      "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
      "modules_to_save": None, "base_model_name_or_path": base_model,
  }
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), tensors, metadata={"format": "pt"})


def write_state(out_dir: str, prompt, classes: list[str], config: dict, personas: list[dict] | None = None) -> str:
  """`OUT/persona_mux.safetensors`: `codebook`, `bias`, `mixtures` (rows in `classes`
  order) and, as metadata, the class names, the prompt config and optionally
  one `{"name", "job", "persona"}` dict per class (a `PersonaBank`)."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, STATE_FILE)
  meta = {"format": "pt", "classes": json.dumps(classes), "config": json.dumps(config)}
  if personas is not None:
    meta["personas"] = json.dumps(personas)
  write_safetensors(path, {
      "codebook": np.asarray(prompt.codebook[...], np.float32),
      "bias": np.asarray(prompt.bias[...], np.float32),
      "mixtures": np.asarray(prompt.mixtures[...], np.float32)[:len(classes)],
  }, metadata=meta)
  return path
