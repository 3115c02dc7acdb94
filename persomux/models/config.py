"""Trunk configuration: one frozen dataclass for every supported family.

`TrunkConfig.from_hf_dict` reads a Hugging Face `config.json` written by
transformers 4.x (`rope_theta`, `rope_scaling`, `torch_dtype`) or 5.x
(`rope_parameters`, `dtype`), filling absent fields with transformers'
defaults, and `to_hf_dict` writes one back that transformers 5 loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "gemma", "gemma2", "gemma3_text", "gemma3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
FULL, SLIDING = "full_attention", "sliding_attention"


class ConfigError(ValueError):
  """A config.json that persomux cannot use; the message names file and field."""


@dataclasses.dataclass(frozen=True)
class LayerGroup:
  """`reps` consecutive repetitions of the layer pattern `kinds`, from layer `start` on.

  The trunk stacks each pattern position's weights over the repetitions and
  scans over them, so layers that differ (Gemma 2's sliding/full pairs,
  Gemma 3's 5 sliding + 1 full) scan as one repeating group.
  """

  start: int
  kinds: tuple[str, ...]
  reps: int

  def layer_index(self, rep: int, position: int) -> int:
    """The decoder-layer index of pattern position `position` in repetition `rep`."""
    return self.start + rep * len(self.kinds) + position


def group_layers(layer_types: tuple[str, ...]) -> tuple[LayerGroup, ...]:
  """Splits `layer_types` into scannable groups, front to back.

  Each group is the repeating pattern that covers the most layers from where
  the previous group ended (ties: the shortest pattern); what no pattern
  repeats over (e.g. Gemma 3 1B's last 2 of 26 layers) becomes a tail group.
  """
  groups, start = [], 0
  while start < len(layer_types):
    rest = layer_types[start:]
    best, covered = (len(rest), 1), 0  # (pattern length, repetitions): one unrepeated pass
    for p in range(1, len(rest) // 2 + 1):
      reps = 1
      while (reps + 1) * p <= len(rest) and rest[reps * p:(reps + 1) * p] == rest[:p]:
        reps += 1
      if reps >= 2 and p * reps > covered:
        best, covered = (p, reps), p * reps
    p, reps = best
    groups.append(LayerGroup(start, tuple(rest[:p]), reps))
    start += p * reps
  return tuple(groups)


# transformers 5 defaults of each family's config class (LlamaConfig, GemmaConfig,
# Gemma2Config, Gemma3TextConfig): what a config.json that leaves a field out means.
# Rope defaults live in `_read_rope`; tests/test_gguf.py checks this table against
# transformers.
_COMMON_DEFAULTS = dict(rms_norm_eps=1e-6, attention_bias=False, bos_token_id=2, eos_token_id=1, pad_token_id=0,
                        tie_word_embeddings=True, head_dim=256)
_GEMMA23_DEFAULTS = _COMMON_DEFAULTS | dict(
    hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
    hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096)
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                  pad_token_id=None, tie_word_embeddings=False, attention_bias=False, mlp_bias=False),
    "gemma": _COMMON_DEFAULTS | dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                                     num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                                     hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192),
    "gemma2": _GEMMA23_DEFAULTS | dict(vocab_size=256000, max_position_embeddings=8192,
                                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": _GEMMA23_DEFAULTS | dict(vocab_size=262208, max_position_embeddings=131072,
                                            attn_logit_softcapping=None, final_logit_softcapping=None),
}
_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def read_config_json(path: str) -> tuple[dict[str, Any], str]:
  """`(dict, file)` of `path/config.json` (or of a config.json file path)."""
  file = path if path.endswith(".json") else os.path.join(path, "config.json")
  if not os.path.isdir(path) and not os.path.isfile(file):
    raise FileNotFoundError(f"{path}: no such model directory")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file}: missing; a Hugging Face model directory needs config.json")
  try:
    with open(file) as f:
      return json.load(f), file
  except json.JSONDecodeError as e:
    raise ConfigError(f"{file}: not valid JSON ({e})") from e


def checkpoint_dtype(cfg: dict[str, Any]) -> str:
  """The dtype a config.json says its weights are in (`dtype`, 4.x `torch_dtype`,
  or the text config's): "float32", "bfloat16" or "float16"; float32 when absent."""
  for d in (cfg, cfg.get("text_config") or {}):
    name = str(d.get("dtype") or d.get("torch_dtype") or "").removeprefix("torch.")
    if name in _DTYPE_NAMES:
      return name
  return "float32"


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding of one attention kind.

  `rope_type` is "default", "linear" (positions divided by `factor`) or
  "llama3" (frequency-dependent scaling of Llama 3.1).
  """

  theta: float = 10000.0
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def to_hf(self) -> dict[str, Any]:
    d: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
    if self.rope_type == "linear":
      d["factor"] = self.factor
    elif self.rope_type == "llama3":
      d.update(factor=self.factor, low_freq_factor=self.low_freq_factor,
               high_freq_factor=self.high_freq_factor,
               original_max_position_embeddings=self.original_max_position_embeddings)
    return d


@dataclasses.dataclass(frozen=True)
class TrunkConfig:
  """Architecture of a decoder trunk.

  `family` is the text model type: "llama", "gemma", "gemma2" or "gemma3_text".
  `layer_types[i]` is "full_attention" or "sliding_attention".
  `rope[kind]` gives the rotary embedding of each attention kind.
  """

  family: str
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  ffn_dim: int
  activation: str = "silu"
  norm_eps: float = 1e-6
  rope: tuple[tuple[str, RopeConfig], ...] = ((FULL, RopeConfig()),)
  layer_types: tuple[str, ...] = ()
  sliding_window: int | None = None
  tie_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  query_pre_attn_scalar: float | None = None
  attn_softcap: float | None = None
  final_softcap: float | None = None
  max_position_embeddings: int = 8192
  bos_token_id: int | None = None
  eos_token_id: int | list[int] | None = None
  pad_token_id: int | None = None
  # Set for Gemma3ForConditionalGeneration checkpoints: tensors live under a
  # language-model prefix and the vision tower is ignored.
  multimodal: bool = False

  def __post_init__(self):
    if not self.layer_types:
      object.__setattr__(self, "layer_types", (FULL,) * self.num_layers)

  @property
  def is_gemma(self) -> bool:
    return self.family.startswith("gemma")

  @property
  def attn_scale(self) -> float:
    scalar = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
    return scalar ** -0.5

  @property
  def embed_scale(self) -> float:
    return math.sqrt(self.d_model) if self.is_gemma else 1.0

  @property
  def layer_groups(self) -> tuple[LayerGroup, ...]:
    return group_layers(self.layer_types)

  def rope_for(self, layer_type: str) -> RopeConfig:
    table = dict(self.rope)
    return table.get(layer_type, table[FULL])

  # --- Named constructors ---------------------------------------------------

  @classmethod
  def llama(cls, *, vocab_size=32000, d_model=512, num_layers=8, num_heads=8, num_kv_heads=4,
            ffn_dim=1376, head_dim=None, rope_theta=10000.0, tie_embeddings=False,
            max_position_embeddings=2048, **kw) -> "TrunkConfig":
    """A Llama-architecture trunk, e.g. the benchmark config (the defaults)."""
    return cls(family="llama", vocab_size=vocab_size, d_model=d_model, num_layers=num_layers,
               num_heads=num_heads, num_kv_heads=num_kv_heads,
               head_dim=head_dim or d_model // num_heads, ffn_dim=ffn_dim, norm_eps=kw.pop("norm_eps", 1e-5),
               rope=((FULL, RopeConfig(theta=rope_theta)),), tie_embeddings=tie_embeddings,
               max_position_embeddings=max_position_embeddings, **kw)

  @classmethod
  def llama3_8b(cls) -> "TrunkConfig":
    return cls.llama(vocab_size=128256, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                     ffn_dim=14336, rope_theta=500000.0, max_position_embeddings=8192,
                     bos_token_id=128000, eos_token_id=128001)

  @classmethod
  def gemma2_27b(cls) -> "TrunkConfig":
    return cls(family="gemma2", vocab_size=256000, d_model=4608, num_layers=46, num_heads=32, num_kv_heads=16,
               head_dim=128, ffn_dim=36864, activation="gelu_pytorch_tanh", norm_eps=1e-6,
               rope=((FULL, RopeConfig(theta=10000.0)), (SLIDING, RopeConfig(theta=10000.0))),
               layer_types=tuple(SLIDING if (i + 1) % 2 else FULL for i in range(46)), sliding_window=4096,
               tie_embeddings=True, query_pre_attn_scalar=144, attn_softcap=50.0, final_softcap=30.0,
               bos_token_id=2, eos_token_id=1, pad_token_id=0)

  # --- Hugging Face config.json ---------------------------------------------

  @classmethod
  def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "TrunkConfig":
    """Builds a TrunkConfig from a Hugging Face config dict (4.x or 5.x keys).

    A field the dict leaves out takes transformers' default for that model
    type (`HF_DEFAULTS`), as `AutoConfig` would; only `model_type` is required.
    """
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ConfigError(
          f"{source}: field 'model_type' is {model_type!r}; persomux supports "
          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    multimodal = model_type == "gemma3"
    if multimodal:
      text = dict(cfg.get("text_config") or {})
      text.setdefault("model_type", "gemma3_text")
      for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if k in cfg and k not in text:
          text[k] = cfg[k]
      base = cls.from_hf_dict(text, source=f"{source} (text_config)")
      return dataclasses.replace(base, multimodal=True)

    family = model_type
    cfg = HF_DEFAULTS[family] | cfg  # a key present with null stays null, as in transformers
    d_model = int(cfg["hidden_size"])
    num_heads = int(cfg["num_attention_heads"])
    num_layers = int(cfg["num_hidden_layers"])
    num_kv_heads = int(cfg["num_key_value_heads"] or num_heads)
    if num_heads % num_kv_heads:
      raise ConfigError(f"{source}: num_attention_heads={num_heads} is not a multiple of "
                        f"num_key_value_heads={num_kv_heads}")
    head_dim = int(cfg["head_dim"] or d_model // num_heads)
    # Each family's transformers MLP reads one key: Llama and Gemma 1 read
    # `hidden_act` (Gemma 1 maps its legacy "gelu" to the tanh approximation),
    # Gemma 2 and 3 read `hidden_activation`.
    act_key = "hidden_activation" if family in ("gemma2", "gemma3_text") else "hidden_act"
    activation = cfg[act_key] or HF_DEFAULTS[family][act_key]
    if family == "gemma" and activation == "gelu":
      activation = "gelu_pytorch_tanh"

    layer_types = cfg.get("layer_types")
    sliding_window = cfg.get("sliding_window")
    if family == "gemma2" and not layer_types:
      layer_types = [SLIDING if (i + 1) % 2 else FULL for i in range(num_layers)]
    if family == "gemma3_text" and not layer_types:
      pattern = int(cfg.get("sliding_window_pattern") or 6)
      layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
    if family in ("llama", "gemma"):
      layer_types, sliding_window = None, None
    layer_types = tuple(layer_types or (FULL,) * num_layers)
    if len(layer_types) != num_layers:
      raise ConfigError(f"{source}: field 'layer_types' has {len(layer_types)} entries, "
                        f"expected num_hidden_layers={num_layers}")
    for t in layer_types:
      if t not in (FULL, SLIDING):
        raise ConfigError(f"{source}: field 'layer_types' has {t!r}; expected "
                          f"'{FULL}' or '{SLIDING}'")
    if SLIDING in layer_types and not sliding_window:
      raise ConfigError(f"{source}: sliding-window layers need field 'sliding_window'")
    if family == "gemma3_text" and cfg.get("use_bidirectional_attention"):
      raise ConfigError(f"{source}: use_bidirectional_attention=true (an encoder) is not a decoder trunk")

    rope = _read_rope(cfg, family, source)
    softcapped = family in ("gemma2", "gemma3_text")
    return cls(
        family=family,
        vocab_size=int(cfg["vocab_size"]),
        d_model=d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        ffn_dim=int(cfg["intermediate_size"]),
        activation=activation,
        norm_eps=float(cfg["rms_norm_eps"]),
        rope=rope,
        layer_types=layer_types,
        sliding_window=int(sliding_window) if sliding_window else None,
        tie_embeddings=bool(cfg["tie_word_embeddings"]),
        attention_bias=bool(cfg.get("attention_bias") or False),
        mlp_bias=bool(cfg.get("mlp_bias") or False) if family == "llama" else False,
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar") if softcapped else None,
        attn_softcap=cfg.get("attn_logit_softcapping") if softcapped else None,
        final_softcap=cfg.get("final_logit_softcapping") if softcapped else None,
        max_position_embeddings=int(cfg["max_position_embeddings"]),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
    )

  @classmethod
  def from_pretrained(cls, path: str) -> "TrunkConfig":
    """Reads `path/config.json` (or a config.json file path directly)."""
    cfg, file = read_config_json(path)
    return cls.from_hf_dict(cfg, source=file)

  def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
    """A transformers-5 config dict for the *text* trunk (`LlamaForCausalLM`,
    `GemmaForCausalLM`, `Gemma2ForCausalLM` or `Gemma3ForCausalLM`)."""
    arch = {"llama": "LlamaForCausalLM", "gemma": "GemmaForCausalLM",
            "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}[self.family]
    d: dict[str, Any] = {
        "architectures": [arch],
        "model_type": self.family,
        "vocab_size": self.vocab_size,
        "hidden_size": self.d_model,
        "intermediate_size": self.ffn_dim,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "rms_norm_eps": self.norm_eps,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_embeddings,
        "attention_bias": self.attention_bias,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "pad_token_id": self.pad_token_id,
        "dtype": dtype,
    }
    d["hidden_activation" if self.family in ("gemma2", "gemma3_text") else "hidden_act"] = self.activation
    if self.family == "llama":
      d["mlp_bias"] = self.mlp_bias
    if self.family == "gemma3_text":
      d["rope_parameters"] = {kind: r.to_hf() for kind, r in self.rope}
    else:
      d["rope_parameters"] = self.rope_for(FULL).to_hf()
    if self.family in ("gemma2", "gemma3_text"):
      d.update(layer_types=list(self.layer_types), sliding_window=self.sliding_window,
               query_pre_attn_scalar=self.query_pre_attn_scalar,
               attn_logit_softcapping=self.attn_softcap,
               final_logit_softcapping=self.final_softcap)
    return d


def _rope_from_dict(r: dict[str, Any], default_theta: float, source: str, field: str) -> RopeConfig:
  rope_type = r.get("rope_type", r.get("type", "default")) or "default"
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise ConfigError(f"{source}: field '{field}' has rope_type {rope_type!r}; persomux supports "
                      f"{', '.join(SUPPORTED_ROPE_TYPES)}")
  theta = float(r.get("rope_theta", default_theta))
  if rope_type == "default":
    return RopeConfig(theta=theta)
  kw = dict(theta=theta, rope_type=rope_type, factor=float(r["factor"]))
  if rope_type == "llama3":
    try:
      kw.update(low_freq_factor=float(r["low_freq_factor"]), high_freq_factor=float(r["high_freq_factor"]),
                original_max_position_embeddings=int(r["original_max_position_embeddings"]))
    except KeyError as e:
      raise ConfigError(f"{source}: llama3 rope scaling in '{field}' is missing {e.args[0]!r}") from e
  return RopeConfig(**kw)


def _read_rope(cfg: dict[str, Any], family: str, source: str) -> tuple[tuple[str, RopeConfig], ...]:
  """Rotary settings per attention kind, from 5.x `rope_parameters` or 4.x
  `rope_theta` / `rope_scaling` / `rope_local_base_freq`."""
  params = cfg.get("rope_parameters")
  if family == "gemma3_text":
    global_theta = float(cfg.get("rope_theta", 1_000_000.0))
    local_theta = float(cfg.get("rope_local_base_freq", 10_000.0))
    if params and (FULL in params or SLIDING in params):
      full = _rope_from_dict(params.get(FULL) or {}, global_theta, source, f"rope_parameters.{FULL}")
      slide = _rope_from_dict(params.get(SLIDING) or {}, local_theta, source, f"rope_parameters.{SLIDING}")
    else:
      scaling = dict(cfg.get("rope_scaling") or params or {})
      full = _rope_from_dict(scaling, global_theta, source, "rope_scaling")
      slide = RopeConfig(theta=local_theta)
    return ((FULL, full), (SLIDING, slide))
  theta = float(cfg.get("rope_theta", 10000.0))
  r = dict(params) if params else dict(cfg.get("rope_scaling") or {})
  field = "rope_parameters" if params else "rope_scaling"
  rope = _rope_from_dict(r, theta, source, field)
  return ((FULL, rope), (SLIDING, rope))
