"""Checkpoint I/O: Hugging Face directories <-> `Trunk` modules.

Only safetensors are read, by a small reader over a memory map: nothing is
ever unpickled. Each tensor is read, cast straight to the target dtype and
placed on device one at a time (each device reading only its own slice), so
loading never holds a second full copy of the model in host memory; saving
streams one tensor at a time into each output file. `hf_name` is the whole
mapping from per-layer module paths to Hugging Face tensor names (weights keep
HF's `[out, in]` layout); `layer_paths` maps a stacked weight of a layer group
(leading `[reps]` axis) to its layers, so files keep Hugging Face's layout.

`load_model` also takes a `.gguf` file or a shipped model's name; those go
through `persomux.models.gguf` and `persomux.models.shipped`.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from persomux.models import shipped
from persomux.models.config import TrunkConfig, checkpoint_dtype, read_config_json
from persomux.models.lora import LoRAParam
from persomux.models.modeling import Trunk


class CheckpointError(ValueError):
  """A checkpoint directory persomux cannot load; the message names the file."""


_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# --- safetensors ---------------------------------------------------------------


class SafetensorsFile:
  """Read-only, zero-copy view of one `.safetensors` file."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
      (n,) = struct.unpack("<Q", raw)
      size = os.fstat(f.fileno()).st_size
      if n > size - 8:
        raise CheckpointError(f"{path}: not a safetensors file (header length {n} exceeds file size)")
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from e
      self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else None
    self._data_start = 8 + n
    header.pop("__metadata__", None)
    self.entries: dict[str, dict[str, Any]] = header

  def keys(self):
    return self.entries.keys()

  def get(self, name: str) -> np.ndarray:
    e = self.entries[name]
    if e["dtype"] not in _DTYPES:
      raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}")
    dtype = np.dtype(_DTYPES[e["dtype"]])
    start, end = e["data_offsets"]
    count = int(np.prod(e["shape"], dtype=np.int64))
    if end - start != count * dtype.itemsize:
      raise CheckpointError(f"{self.path}: tensor {name!r} has {end - start} bytes, expected "
                            f"{count * dtype.itemsize} for shape {e['shape']} {e['dtype']}")
    if count == 0:
      return np.zeros(e["shape"], dtype)
    return np.frombuffer(self._mmap, dtype=dtype, count=count,
                         offset=self._data_start + start).reshape(e["shape"])


@dataclasses.dataclass(frozen=True)
class LazyTensor:
  """A tensor to write whose data `load()` fetches only when its turn comes."""

  shape: tuple[int, ...]
  dtype: np.dtype
  load: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_safetensors(path: str, tensors: dict[str, np.ndarray | LazyTensor], metadata: dict[str, str] | None = None):
  """Writes `tensors` to `path` atomically (temp file + rename), one at a time.

  A `LazyTensor` is loaded only while it is written, so a file of lazy
  tensors never holds more than one of them in host memory.
  """
  header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
  offset = 0
  for name, arr in tensors.items():
    header[name] = {"dtype": _DTYPE_NAMES[np.dtype(arr.dtype)], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, arr in tensors.items():
      data = np.ascontiguousarray(arr.load() if isinstance(arr, LazyTensor) else arr)
      if data.shape != tuple(arr.shape) or data.dtype != np.dtype(arr.dtype):
        raise ValueError(f"{path}: tensor {name!r} loaded as {data.shape} {data.dtype}, "
                         f"expected {tuple(arr.shape)} {np.dtype(arr.dtype)}")
      f.write(data.reshape(-1).view(np.uint8).data)
      del data
  os.replace(tmp, path)


class TensorStore:
  """All tensors of a checkpoint directory: single file or sharded with an index."""

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, INDEX_FILE)
    single = os.path.join(directory, SINGLE_FILE)
    self.files: dict[str, SafetensorsFile] = {}
    self.where: dict[str, str] = {}
    if os.path.isfile(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object ({e})") from e
      for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(directory, shard)
        if not os.path.isfile(shard_path):
          raise CheckpointError(f"{index}: names shard {shard!r}, which is missing from {directory}")
        self.files[shard] = SafetensorsFile(shard_path)
      for name, shard in weight_map.items():
        if name not in self.files[shard].entries:
          raise CheckpointError(f"{index}: maps tensor {name!r} to {shard}, which does not contain it")
        self.where[name] = shard
    elif os.path.isfile(single):
      self.files[SINGLE_FILE] = SafetensorsFile(single)
      self.where = {name: SINGLE_FILE for name in self.files[SINGLE_FILE].keys()}
    else:
      shards = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
      if shards:
        for s in shards:
          sf = SafetensorsFile(s)
          self.files[os.path.basename(s)] = sf
          self.where.update({name: os.path.basename(s) for name in sf.keys()})
        return
      pickles = sorted(p for pat in _PICKLE_PATTERNS for p in glob.glob(os.path.join(directory, pat)))
      if pickles:
        raise CheckpointError(
            f"{directory}: holds only pickle weights ({', '.join(map(os.path.basename, pickles))}); "
            "persomux loads safetensors only and never unpickles. Convert the checkpoint to "
            "model.safetensors (e.g. save_pretrained(..., safe_serialization=True)) in a trusted environment.")
      raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} found")

  def __contains__(self, name: str) -> bool:
    return name in self.where

  def file_of(self, name: str) -> str:
    return os.path.join(self.directory, self.where[name])

  def get(self, name: str) -> np.ndarray:
    return self.files[self.where[name]].get(name)


# --- name mapping --------------------------------------------------------------

_LAYER_RULES = {
    # module path inside a layer -> HF name inside `model.layers.{i}.`
    "attn_norm.weight": "input_layernorm.weight",
    "attn_post_norm.weight": "post_attention_layernorm.weight",
    "mlp_post_norm.weight": "post_feedforward_layernorm.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
}


def hf_name(path: tuple, cfg: TrunkConfig, prefix: str = "model.") -> str:
  """Hugging Face tensor name of the `Trunk` weight at `path`.

  `path` is a top-level weight (`embed_tokens`, `norm.weight`, `lm_head`) or a
  per-layer path `("layers", i, ...)` as `layer_paths` gives for a stacked
  weight. `prefix` is the text model's prefix: "model." for `*ForCausalLM`,
  e.g. "model.language_model." for `Gemma3ForConditionalGeneration`.
  """
  key = ".".join(str(p) for p in path)
  if key == "embed_tokens":
    return prefix + "embed_tokens.weight"
  if key == "norm.weight":
    return prefix + "norm.weight"
  if key == "lm_head":
    return "lm_head.weight"
  m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
  if not m:
    raise KeyError(f"no Hugging Face name for module path {key!r}")
  i, rest = m.groups()
  if rest == "mlp_norm.weight":
    hf = "pre_feedforward_layernorm.weight" if cfg.family in ("gemma2", "gemma3_text") \
        else "post_attention_layernorm.weight"
  elif rest in _LAYER_RULES:
    hf = _LAYER_RULES[rest]
  else:
    mm = re.fullmatch(r"(attn|mlp)\.(\w+_proj)\.(weight|bias)", rest)
    if not mm:
      raise KeyError(f"no Hugging Face name for module path {key!r}")
    block, proj, kind = mm.groups()
    hf = f"{'self_attn' if block == 'attn' else 'mlp'}.{proj}.{kind}"
  return f"{prefix}layers.{i}.{hf}"


def layer_paths(path: tuple, cfg: TrunkConfig) -> list[tuple] | None:
  """Per-layer paths `("layers", i, ...)` of the stacked weight at `path`
  (`("groups", g, "layers", j, ...)`), one per repetition; None for a weight
  outside the layer groups."""
  if len(path) < 4 or path[0] != "groups":
    return None
  group = cfg.layer_groups[int(path[1])]
  return [("layers", group.layer_index(r, int(path[3])), *path[4:]) for r in range(group.reps)]


_TEXT_PREFIXES = ("model.", "model.language_model.", "language_model.model.")


def _text_prefix(store: TensorStore, cfg: TrunkConfig) -> str:
  candidates = _TEXT_PREFIXES[1:] if cfg.multimodal else _TEXT_PREFIXES[:1]
  for p in candidates:
    if p + "embed_tokens.weight" in store:
      return p
  raise CheckpointError(
      f"{store.directory}: tensor {candidates[0] + 'embed_tokens.weight'!r} is missing "
      f"(looked for the embedding under {', '.join(candidates)})")


# --- load / save ---------------------------------------------------------------


def _abstract_trunk(cfg: TrunkConfig, dtype, remat) -> Trunk:
  return nnx.eval_shape(lambda: Trunk(cfg, dtype=dtype, rngs=None, remat=remat))


# `(module_path, shape) -> jax.sharding.Sharding` of one weight; None: the default device.
Placer = Callable[[tuple, tuple], jax.sharding.Sharding]


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked, layer, rep):
  return jax.lax.dynamic_update_index_in_dim(stacked, layer, rep, 0)


def _put(host: np.ndarray, dtype, sharding) -> jax.Array:
  """`host` cast to `dtype` on device; with a sharding, each device reads only its slice."""
  if sharding is None:
    return jax.device_put(np.asarray(host, dtype=dtype))
  return jax.make_array_from_callback(tuple(host.shape), sharding, lambda idx: np.asarray(host[idx], dtype=dtype))


def _layer_sharding(sharding):
  """The sharding of one repetition of a stacked weight sharded by `sharding`."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
  return sharding


def build_trunk(cfg: TrunkConfig, fetch: Callable[[tuple, tuple], np.ndarray], *, dtype, remat=False,
                place: Placer | None = None, progress: Callable | None = None) -> Trunk:
  """A `Trunk` filled one tensor at a time, never holding two copies of the model.

  Args:
    fetch: `(module_path, expected_shape) -> host array` of one weight, with
      per-layer paths for stacked weights (see `layer_paths`); it raises
      `CheckpointError` for a missing or misshapen tensor.
    dtype: parameter dtype; each host array is cast to it as it is placed.
    remat: the trunk's remat policy (see `modeling.REMAT_POLICIES`).
    place: the sharding of each weight (see `Placer`); default: the default
      device. A stacked weight is filled on device one layer at a time.
    progress: optional wrapper of the tensor iterable (e.g. `tqdm`).
  """
  graphdef, state = nnx.split(_abstract_trunk(cfg, jnp.dtype(dtype), remat))
  place = place or (lambda path, shape: None)
  flat = nnx.to_flat_state(state)
  values = []
  for mpath, var in (progress or (lambda x: x))(flat):
    want = var.get_value()
    shape = tuple(want.shape)
    sharding = place(mpath, shape)
    layers = layer_paths(mpath, cfg)
    if layers is None:
      values.append(_put(fetch(mpath, shape), want.dtype, sharding))
      continue
    stacked = jnp.zeros(shape, want.dtype, device=sharding)
    for rep, lpath in enumerate(layers):
      layer = _put(fetch(lpath, shape[1:]), want.dtype, _layer_sharding(sharding))
      stacked = _set_layer(stacked, layer, rep)
    values.append(stacked)
  state = nnx.from_flat_state([(p, v.replace(value)) for (p, v), value in zip(flat, values)])
  return nnx.merge(graphdef, state)


def load_trunk(path: str, *, dtype=None, remat=False, place: Placer | None = None) -> Trunk:
  """Loads the `Trunk` stored in a Hugging Face directory.

  Args:
    path: local directory with config.json and safetensors weights.
    dtype: parameter dtype; every tensor is cast to it as it is read. None:
      the checkpoint's own (config.json `dtype` / `torch_dtype`, else float32).
    remat: the remat policy of the decoder layers (see `modeling.REMAT_POLICIES`;
      True = "full").
    place: see `build_trunk`.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such model directory")
  raw, file = read_config_json(path)
  cfg = TrunkConfig.from_hf_dict(raw, source=file)
  store = TensorStore(path)
  prefix = _text_prefix(store, cfg)

  def fetch(mpath, shape):
    name = hf_name(mpath, cfg, prefix)
    if name == "lm_head.weight" and name not in store and "language_model.lm_head.weight" in store:
      name = "language_model.lm_head.weight"
    if name not in store:
      raise CheckpointError(f"{path}: tensor {name!r} is missing (needed for {cfg.family}, shape {shape})")
    arr = store.get(name)
    if tuple(arr.shape) != shape:
      raise CheckpointError(f"{store.file_of(name)}: tensor {name!r} has shape {tuple(arr.shape)}, "
                            f"expected {shape} from config.json")
    return arr

  return build_trunk(cfg, fetch, dtype=dtype or checkpoint_dtype(raw), remat=remat, place=place)


def load_tokenizer(path: str):
  """The tokenizer of a Hugging Face directory, via transformers' AutoTokenizer (offline)."""
  from transformers import AutoTokenizer

  names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
  if not any(os.path.isfile(os.path.join(path, n)) for n in names):
    raise CheckpointError(f"{path}: no tokenizer files ({', '.join(names)}); pass tokenizer=False "
                          "to load the weights alone")
  return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _resolve(path) -> str:
  """A shipped model's name -> its GGUF file; anything else as given."""
  path = os.fspath(path)
  return shipped.resolve(path) if path in shipped.NAMES else path


def _is_gguf(path: str) -> bool:
  return path.endswith(".gguf") and not os.path.isdir(path)


def load_config(path: str) -> TrunkConfig:
  """The `TrunkConfig` of anything `load_model` takes (no weights are read)."""
  path = _resolve(path)
  if _is_gguf(path):
    from persomux.models import gguf

    return gguf.GGUFFile(path).config
  return TrunkConfig.from_pretrained(path)


def load_model(path: str, *, dtype=None, tokenizer: bool = True, remat=False, mesh=None):
  """Loads a frozen trunk and its tokenizer.

  Args:
    path: a local Hugging Face directory, a `.gguf` file (llama.cpp's format,
      dequantized on load), or the name of a shipped model
      (`persomux.models.shipped.NAMES`: "smollm2-135m-instruct", "gemma3-270m").
    dtype: parameter dtype, e.g. "bfloat16". None (or ""): the checkpoint's
      own; float32 for GGUF files, whose quantized weights have no float type.
    tokenizer: also load the tokenizer (from the GGUF metadata for GGUF files).
    remat: how decoder layers rematerialize in the backward pass: "none",
      "full" or "save_qkv_mlp" (see `modeling.REMAT_POLICIES`); a bool means
      "full" (True) or "none" (False).
    mesh: read each weight straight into its shards (see `persomux.sharding`);
      the model is then called like an unsharded one.

  Returns:
    `(model, tokenizer)`; `tokenizer` is None when `tokenizer=False`.
  """
  place = None
  if mesh is not None:
    from persomux import sharding

    place = sharding.shard_placer(mesh)
  path = _resolve(path)
  if _is_gguf(path):
    from persomux.models import gguf

    return gguf.load(path, dtype=dtype or None, tokenizer=tokenizer, remat=remat, place=place)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such model directory, .gguf file or shipped model name "
                            f"({', '.join(shipped.NAMES)})")
  model = load_trunk(path, dtype=dtype or None, remat=remat, place=place)
  return model, (load_tokenizer(path) if tokenizer else None)


def _hf_tensors(model: Trunk) -> list[tuple[str, LazyTensor]]:
  """`(hf_name, lazy host tensor)` of every trunk weight in Hugging Face's order:
  embedding, layers 0.., final norm, head. A stacked weight gives one tensor
  per layer, each gathered from its devices only when loaded."""
  cfg = model.config
  top, per_layer = [], {}
  # LoRA adapters are exported on their own (persomux.export.peft_export), never into the trunk.
  for mpath, var in nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))):
    value = var.get_value()
    layers = layer_paths(mpath, cfg)
    if layers is None:
      # Fetched from a copy: jax caches a fetched array's host value on the array itself.
      top.append((hf_name(mpath, cfg), LazyTensor(tuple(value.shape), np.dtype(value.dtype),
                                                  lambda v=value: np.asarray(jax.device_get(jnp.copy(v))))))
      continue
    for rep, lpath in enumerate(layers):
      per_layer.setdefault(lpath[1], []).append((hf_name(lpath, cfg), LazyTensor(
          tuple(value.shape[1:]), np.dtype(value.dtype), lambda v=value, r=rep: np.asarray(jax.device_get(v[r])))))
  first = [t for t in top if t[0].endswith("embed_tokens.weight")]
  last = sorted((t for t in top if t not in first), key=lambda t: t[0] == "lm_head.weight")
  return first + [t for i in sorted(per_layer) for t in per_layer[i]] + last


def iter_hf_tensors(model: Trunk) -> Iterator[tuple[str, np.ndarray]]:
  """`(hf_name, host array)` for every trunk tensor, one at a time, in Hugging Face's order."""
  for name, tensor in _hf_tensors(model):
    yield name, tensor.load()


def save_model(model: Trunk, tokenizer, path: str, *, max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes `model` (and `tokenizer`, if given) as a Hugging Face directory.

  The result loads with `transformers.AutoModelForCausalLM.from_pretrained`
  and with `load_model`. Multimodal Gemma 3 trunks are written as their text
  model (`Gemma3ForCausalLM`). Weights larger than `max_shard_bytes` are split
  into `model-0000x-of-0000y.safetensors` shards with an index. Tensors are
  fetched from their devices one at a time as they are written, so host memory
  holds one tensor (one layer's slice of a stacked weight), never the model.
  """
  os.makedirs(path, exist_ok=True)
  dtype_name = jnp.dtype(model.dtype).name
  shards: list[dict[str, LazyTensor]] = [{}]
  size = 0
  for name, tensor in _hf_tensors(model):
    if shards[-1] and size + tensor.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensor
    size += tensor.nbytes
  if len(shards) == 1:
    write_safetensors(os.path.join(path, SINGLE_FILE), shards[0])
  else:
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      write_safetensors(os.path.join(path, fname), shard)
      weight_map.update({n: fname for n in shard})
      total += sum(t.nbytes for t in shard.values())
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(model.config.to_hf_dict(dtype=dtype_name), f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
