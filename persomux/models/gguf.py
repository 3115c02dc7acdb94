"""GGUF checkpoints (llama.cpp's single-file format) -> `Trunk` modules.

The `gguf` package reads the file (`GGUFReader`) and dequantizes it
(`gguf.quants.dequantize`); nothing here parses the format. Tensor names come
from gguf's own Hugging Face -> llama.cpp table (`gguf.get_tensor_name_map`)
applied to `params.hf_name`, so the module-path mapping stays one table.

llama.cpp's converter changes three things, undone here as transformers'
GGUF loader undoes them:
  * Llama q/k projection rows are permuted per head (rotary halves interleaved);
  * Gemma RMSNorm weights are stored as `1 + w` (every `*norm.weight`);
  * the config lives in metadata (`{arch}.embedding_length`, ...), turned into
    a config.json-style dict so fields the file leaves out take transformers'
    defaults exactly as they do for a Hugging Face directory.

Each tensor is dequantized to float32, fixed up, and handed to `place`, which
casts it to the target dtype: one tensor at a time, never a second model copy.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from persomux.models.config import HF_DEFAULTS, RopeConfig, TrunkConfig
from persomux.models.modeling import Trunk, rope_inv_freq
from persomux.models.params import CheckpointError, Placer, build_trunk, hf_name

# general.architecture -> TrunkConfig.family
ARCHITECTURES = {"llama": "llama", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}
# llama.cpp sizes the 27B Gemmas' attention scale by d_model / heads, every other by head_dim.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


class GGUFFile:
  """An opened `.gguf` file: metadata, tensors by llama.cpp name, trunk config.

  Opening reads metadata and the tensor table only (tensor data stays memory
  mapped). A truncated or corrupt file, or an architecture persomux has no
  trunk for, raises `CheckpointError` naming the file.
  """

  def __init__(self, path: str):
    import gguf

    self.path = path
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
      reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails with ValueError, IndexError, ... on bad bytes
      raise CheckpointError(_unreadable(path, e)) from e
    self.fields = reader.fields
    self.tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
      if t.data.nbytes != t.n_bytes:
        raise CheckpointError(f"{path}: truncated GGUF file (tensor {t.name!r} has {t.data.nbytes} of its "
                              f"{t.n_bytes} bytes)")
    self.arch = self.get("general.architecture")
    if self.arch not in ARCHITECTURES:
      raise CheckpointError(f"{path}: general.architecture is {self.arch!r}; persomux loads GGUF files of "
                            f"{', '.join(ARCHITECTURES)}")
    self.family = ARCHITECTURES[self.arch]
    self.config = TrunkConfig.from_hf_dict(self.hf_config(), source=f"{path} (GGUF metadata)")
    self._names = gguf.get_tensor_name_map(
        {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[self.arch], self.config.num_layers)

  def get(self, key: str, default=None) -> Any:
    """A metadata value (`str`, number, or list for arrays), or `default`."""
    field = self.fields.get(key)
    return default if field is None else field.contents()

  def _arch(self, key: str, default=None) -> Any:
    return self.get(f"{self.arch}.{key}", default)

  # --- config ---------------------------------------------------------------

  def hf_config(self) -> dict[str, Any]:
    """The metadata as a Hugging Face config dict; absent keys are left out."""
    d: dict[str, Any] = {"model_type": self.family}
    keys = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
            "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
            "num_key_value_heads": "attention.head_count_kv", "rms_norm_eps": "attention.layer_norm_rms_epsilon",
            "max_position_embeddings": "context_length", "rope_theta": "rope.freq_base",
            "sliding_window": "attention.sliding_window", "attn_logit_softcapping": "attn_logit_softcapping",
            "final_logit_softcapping": "final_logit_softcapping", "rope_local_base_freq": "rope.freq_base_swa"}
    for hf_key, key in keys.items():
      if (value := self._arch(key)) is not None:
        d[hf_key] = self._uniform(key, value)
    for hf_key, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("pad_token_id", "padding_token_id")):
      if (value := self.get(f"tokenizer.ggml.{key}")) is not None:
        d[hf_key] = value
    d["vocab_size"] = self._vocab_size()
    d["tie_word_embeddings"] = "output.weight" not in self.tensors
    d["attention_bias"] = "blk.0.attn_q.bias" in self.tensors
    if self.family == "llama":
      d["mlp_bias"] = "blk.0.ffn_up.bias" in self.tensors
    self._head_dim(d)
    self._rope_scaling(d)
    self._sliding_pattern(d)
    if self.family in ("gemma2", "gemma3_text"):
      d["query_pre_attn_scalar"] = self._query_pre_attn_scalar(d)
    return d

  def _uniform(self, key: str, value):
    """A per-layer array (as some files write head counts) must be one value."""
    if isinstance(value, list):
      if len(set(value)) != 1:
        raise CheckpointError(f"{self.path}: {self.arch}.{key} differs between layers ({value}); "
                              "persomux trunks have one value for every layer")
      return value[0]
    return value

  def _vocab_size(self) -> int:
    if (n := self._arch("vocab_size")) is not None:
      return int(n)
    if "tokenizer.ggml.tokens" in self.fields:
      return len(self.fields["tokenizer.ggml.tokens"].data)
    if "token_embd.weight" in self.tensors:
      return int(self.tensors["token_embd.weight"].shape[-1])
    raise CheckpointError(f"{self.path}: no vocabulary size ({self.arch}.vocab_size, tokenizer.ggml.tokens "
                          "or token_embd.weight)")

  def _head_dim(self, d: dict) -> None:
    key_len, value_len = self._arch("attention.key_length"), self._arch("attention.value_length")
    rope_dims = self._arch("rope.dimension_count")
    if key_len is not None and value_len is not None and key_len != value_len:
      raise CheckpointError(f"{self.path}: attention.key_length {key_len} != value_length {value_len}; "
                            "persomux trunks need one head_dim")
    head_dim = key_len if key_len is not None else (rope_dims if self.family == "llama" else None)
    if head_dim is not None:
      d["head_dim"] = int(head_dim)
    if self.family == "llama" and rope_dims is not None and head_dim is not None and rope_dims != head_dim:
      raise CheckpointError(f"{self.path}: rope.dimension_count {rope_dims} != head_dim {head_dim} (partial "
                            "rotary); persomux's Llama trunk rotates whole heads")

  def _rope_scaling(self, d: dict) -> None:
    kind = self._arch("rope.scaling.type")
    if kind == "linear":
      d["rope_scaling"] = {"rope_type": "linear", "factor": float(self._arch("rope.scaling.factor"))}
    elif kind not in (None, "none"):
      d["rope_scaling"] = {"rope_type": kind}  # from_hf_dict names it as unsupported
    if "rope_freqs.weight" in self.tensors:
      d["rope_scaling"] = self._llama3_rope(d)

  def _llama3_rope(self, d: dict) -> dict:
    """Llama 3.1+ files store their rope scaling as per-frequency divisors
    (`rope_freqs.weight`), not as metadata; recover the llama3 parameters that
    produce them (llama.cpp's converter uses low/high factors 1 and 4)."""
    freqs = self.tensor("rope_freqs.weight")
    orig = int(self._arch("rope.scaling.original_context_length", 8192))
    theta = float(d.get("rope_theta", 10000.0))
    rope = RopeConfig(theta=theta, rope_type="llama3", factor=float(freqs.max()), low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=orig)
    dims = 2 * len(freqs)
    divisors = rope_inv_freq(RopeConfig(theta=theta), dims) / rope_inv_freq(rope, dims)
    if self.family != "llama" or not np.allclose(divisors, freqs, rtol=1e-4):
      raise CheckpointError(f"{self.path}: tensor 'rope_freqs.weight' is not the llama3 rope scaling persomux "
                            f"supports (factor {rope.factor}, low/high 1/4, original context {orig})")
    return rope.to_hf()

  def _sliding_pattern(self, d: dict) -> None:
    pattern = self._arch("attention.sliding_window_pattern")
    if isinstance(pattern, list):  # one flag per layer: true = sliding
      d["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    elif pattern is not None:
      d["sliding_window_pattern"] = int(pattern)

  def _query_pre_attn_scalar(self, d: dict) -> float:
    if (scale := self._arch("attention.scale")) is not None:
      return float(scale) ** -2
    defaults = HF_DEFAULTS[self.family]
    if d.get("num_hidden_layers") == _GEMMA_27B_LAYERS.get(self.arch):
      return d.get("hidden_size", defaults["hidden_size"]) // d.get("num_attention_heads",
                                                                    defaults["num_attention_heads"])
    return d.get("head_dim", defaults["head_dim"])

  # --- tensors --------------------------------------------------------------

  def tensor(self, name: str) -> np.ndarray:
    """Tensor `name` dequantized to float32, in numpy (row-major) order."""
    import gguf

    t = self.tensors[name]
    try:
      arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
      raise CheckpointError(f"{self.path}: tensor {name!r} has quantization type {t.tensor_type.name}, which "
                            "the gguf package cannot dequantize") from e
    return np.asarray(arr, np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))

  def gguf_name(self, mpath: tuple) -> str:
    """llama.cpp name of the `Trunk` weight at `mpath`, e.g. "blk.0.attn_q.weight"."""
    base, suffix = hf_name(mpath, self.config).rsplit(".", 1)
    name = self._names.get_name(base) or ("output" if base == "lm_head" else base)
    return f"{name}.{suffix}"

  def fetch(self, mpath: tuple, shape: tuple) -> np.ndarray:
    """The `Trunk` weight at `mpath` as a float32 host array of `shape`."""
    name = self.gguf_name(mpath)
    if name not in self.tensors:
      raise CheckpointError(f"{self.path}: tensor {name!r} is missing (needed for {self.family}, shape {shape})")
    arr = self.tensor(name)
    if arr.shape != shape:
      raise CheckpointError(f"{self.path}: tensor {name!r} has shape {arr.shape}, expected {shape} from the "
                            "GGUF metadata")
    kind = name.split(".")[-2]
    if self.family == "llama" and kind in ("attn_q", "attn_k"):
      cfg = self.config
      arr = unpermute_rows(arr, cfg.num_heads if kind == "attn_q" else cfg.num_kv_heads)
    if self.config.is_gemma and name.endswith("norm.weight"):
      arr = arr - np.float32(1.0)
    return arr


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undo convert_hf_to_gguf's Llama q/k permutation of a `[n_head * head_dim, ...]`
  weight or bias: per head, rows `(2, head_dim/2)` were stored as `(head_dim/2, 2)`."""
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unreadable(path: str, e: Exception) -> str:
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    return f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)"
  return f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})"


def load_trunk(path: str | GGUFFile, *, dtype=None, remat: bool = False, place: Placer | None = None,
               progress: bool = False) -> Trunk:
  """The `Trunk` of a `.gguf` file, dequantized to `dtype` (None: float32).

  `place` is as in `params.build_trunk`; `progress` shows a tqdm bar.
  """
  f = path if isinstance(path, GGUFFile) else GGUFFile(path)
  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = lambda it: tqdm(it, desc=f"dequantizing {os.path.basename(f.path)}", unit="tensor")
  return build_trunk(f.config, f.fetch, dtype=dtype or "float32", remat=remat, place=place, progress=bar)


def load_tokenizer(path: str | GGUFFile):
  """The tokenizer a `.gguf` file describes, built by transformers' GGUF support,
  with the chat template from the metadata (`tokenizer.chat_template`)."""
  from transformers import AutoTokenizer

  f = path if isinstance(path, GGUFFile) else GGUFFile(path)
  if "tokenizer.ggml.model" not in f.fields:
    raise CheckpointError(f"{f.path}: no tokenizer in the GGUF metadata (tokenizer.ggml.*); pass "
                          "tokenizer=False to load the weights alone")
  directory, name = os.path.split(os.path.abspath(f.path))
  tok = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
  template = f.get("tokenizer.chat_template")
  if template and not tok.chat_template:
    tok.chat_template = template
  return tok


def load(path: str, *, dtype=None, tokenizer: bool = True, remat: bool = False, place: Placer | None = None,
         progress: bool = False):
  """`(trunk, tokenizer or None)` of a `.gguf` file, opening it once."""
  f = GGUFFile(path)
  model = load_trunk(f, dtype=dtype, remat=remat, place=place, progress=progress)
  return model, (load_tokenizer(f) if tokenizer else None)
