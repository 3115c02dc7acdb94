"""Class-labelled text -> tokenized, padded batches with a soft-token slot.

Records (JSONL, CSV or Parquet, read with Hugging Face `datasets`) carry
`class` and `text`, and optionally `context`, `persona` and `group`. They are
split by class into pretraining and held-out finetuning classes (groups never
straddle the split), then per class into train and test.

Each example is tokenized in three pieces: `prefix` (BOS, chat header, text
persona), `suffix` (the rest of the prompt: context, instruction) and `target`
(the text the model must produce, then EOS or the end-of-turn tokens). The
soft tokens go between prefix and suffix: right after the persona, or right
after BOS / the chat header when there is none. Only target tokens carry loss.

A batch is a dict of numpy arrays:
  input_ids       int32   [batch, seq]  prefix ⊕ suffix ⊕ target, right padded
  attention_mask  int32   [batch, seq]  1 on real tokens
  loss_mask       float32 [batch, seq]  1 where the token is a target token; the
                                        training loss predicts token t from the
                                        position just before it
  soft_index      int32   [batch]       where the soft tokens are inserted (= len(prefix))
  class_ids       int32   [batch]
  targets         int32   [batch, m]    each row's target positions (t >= 1 with
                                        loss_mask 1) in order, then 0; m is the
                                        longest row's count, bucketed: the loss
                                        computes logits only there
Rows added to fill the last batch have all-zero masks.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import math
import os
from collections.abc import Iterable, Sequence

import numpy as np

SOFT = "{soft}"
DEFAULT_TEMPLATE = "{persona}{soft}\n{context}\n"
DEFAULT_INSTRUCTION = "Continue."
_SOFT_MARK = "\u2063SOFT\u2063"
_TEXT_MARK = "\u2063TEXT\u2063"
_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
  """Unusable data; the message names the file, the field and what was expected."""


@dataclasses.dataclass(frozen=True)
class Record:
  """One example: `cls` produced `text` (after `context`)."""

  cls: str
  text: str
  context: str | None = None
  persona: str | None = None
  group: str | None = None

  def to_json(self) -> dict:
    return {"class": self.cls, "text": self.text, "context": self.context, "persona": self.persona,
            "group": self.group}


# --- reading ---------------------------------------------------------------------------


def _files(path_or_paths) -> list[str]:
  paths = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
  out = []
  for p in map(str, paths):
    if os.path.isdir(p):
      found = sorted(f for ext in _FORMATS for f in glob.glob(os.path.join(p, f"*{ext}")))
      if not found:
        raise DataError(f"{p}: directory holds no {', '.join(_FORMATS)} files")
      out.extend(found)
    elif os.path.isfile(p):
      out.append(p)
    else:
      raise DataError(f"{p}: no such file")
  for f in out:
    if os.path.splitext(f)[1].lower() not in _FORMATS:
      raise DataError(f"{f}: unsupported extension; expected one of {', '.join(_FORMATS)}")
  return out


def _clean(v) -> str | None:
  if v is None:
    return None
  if isinstance(v, float) and math.isnan(v):
    return None
  s = str(v)
  return s if s.strip() else None


def load_records(path_or_paths) -> tuple[list[Record], collections.Counter]:
  """Reads records from JSONL/CSV/Parquet files (or directories of them).

  Returns `(records, skipped)`, where `skipped` counts dropped rows by reason.
  Raises `DataError` for a missing file, a missing `class`/`text` column or
  an empty dataset.
  """
  import datasets

  datasets.disable_progress_bars()
  records: list[Record] = []
  skipped: collections.Counter = collections.Counter()
  for f in _files(path_or_paths):
    if os.path.getsize(f) == 0:
      raise DataError(f"{f}: file is empty; expected records with 'class' and 'text'")
    fmt = _FORMATS[os.path.splitext(f)[1].lower()]
    try:
      ds = datasets.load_dataset(fmt, data_files=f, split="train")
    except Exception as e:  # datasets raises many types for malformed files
      raise DataError(f"{f}: cannot read as {fmt}: {e}") from e
    for field in ("class", "text"):
      if field not in ds.column_names:
        raise DataError(f"{f}: missing field {field!r}; columns are {ds.column_names}")
    cols = {c: ds[c] if c in ds.column_names else [None] * len(ds)
            for c in ("class", "text", "context", "persona", "group")}
    for i in range(len(ds)):
      cls, text = _clean(cols["class"][i]), _clean(cols["text"][i])
      if cls is None:
        skipped["missing class"] += 1
        continue
      if text is None:
        skipped["empty text"] += 1
        continue
      records.append(Record(cls, text, _clean(cols["context"][i]), _clean(cols["persona"][i]),
                            _clean(cols["group"][i])))
  if not records:
    raise DataError(f"{', '.join(_files(path_or_paths))}: dataset is empty (no record with a "
                    f"'class' and a non-empty 'text'; skipped: {dict(skipped)})")
  return records, skipped


def write_jsonl(records: Iterable[Record | dict], path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in records:
      f.write(json.dumps(r.to_json() if isinstance(r, Record) else r) + "\n")
  os.replace(tmp, path)


def by_class(records: Iterable[Record]) -> dict[str, list[Record]]:
  out: dict[str, list[Record]] = collections.defaultdict(list)
  for r in records:
    out[r.cls].append(r)
  return dict(out)


# --- splits -----------------------------------------------------------------------------


def split_classes(records: Sequence[Record], finetune_fraction: float = 0.1,
                  seed: int = 0) -> tuple[list[str], list[str]]:
  """Class-level split into (pretraining classes, finetuning classes).

  Finetuning classes hold about `finetune_fraction` of the records. Classes
  that share a `group` (or appear in several groups linked by a class) go to
  the same side. Deterministic for a seed.
  """
  if not 0.0 < finetune_fraction < 1.0:
    raise DataError(f"data.finetune_fraction is {finetune_fraction}; expected a value in (0, 1)")
  parent: dict[str, str] = {}

  def find(x):
    while parent.setdefault(x, x) != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  size: collections.Counter = collections.Counter()
  for r in records:
    c = "class:" + r.cls
    g = "group:" + r.group if r.group else c
    parent[find(c)] = find(g)
  for r in records:
    size[find("class:" + r.cls)] += 1
  units = sorted(size)
  if len(units) < 2:
    raise DataError(f"cannot split {len(units)} class group(s) into pretraining and finetuning classes; "
                    "expected at least two independent groups")
  order = np.random.default_rng(seed).permutation(len(units))
  target = finetune_fraction * len(records)
  chosen, total = set(), 0
  for i in order:
    u = units[i]
    if total + size[u] <= target or not chosen:
      chosen.add(u)
      total += size[u]
    if total >= target:
      break
  if len(chosen) == len(units):
    chosen.discard(units[order[-1]])
  fine = sorted({r.cls for r in records if find("class:" + r.cls) in chosen})
  pre = sorted({r.cls for r in records} - set(fine))
  return pre, fine


def check_disjoint(pretrain: Iterable[str], finetune: Iterable[str], source: str = "finetune classes") -> None:
  both = sorted(set(pretrain) & set(finetune))
  if both:
    raise DataError(f"{source}: classes {both[:5]}{'...' if len(both) > 5 else ''} also appear in "
                    "pretraining; stage-2 classes must be new")


def select_classes(records: Sequence[Record], classes: Iterable[str], source: str = "data") -> list[Record]:
  """The records of `classes`; a class with no examples is an error."""
  groups = by_class(records)
  missing = [c for c in classes if c not in groups]
  if missing:
    raise DataError(f"{source}: class {missing[0]!r} has no examples"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  return [r for c in classes for r in groups[c]]


def cap_per_class(records: Sequence[Record], max_per_class: int, seed: int = 0) -> list[Record]:
  """At most `max_per_class` records per class (a seeded sample); 0 keeps all."""
  if not max_per_class:
    return list(records)
  rng = np.random.default_rng(seed)
  out = []
  for cls, rs in sorted(by_class(records).items()):
    idx = sorted(rng.permutation(len(rs))[:max_per_class])
    out.extend(rs[i] for i in idx)
  return out


def split_train_test(records: Sequence[Record], test_fraction: float = 0.1,
                     seed: int = 0) -> tuple[list[Record], list[Record]]:
  """Per-class train/test split; every class keeps at least one train example,
  and a class with two or more examples gives at least one to test."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for cls, rs in sorted(by_class(records).items()):
    perm = rng.permutation(len(rs))
    n_test = 0 if len(rs) < 2 or test_fraction <= 0 else min(max(1, round(len(rs) * test_fraction)), len(rs) - 1)
    test.extend(rs[i] for i in sorted(perm[:n_test]))
    train.extend(rs[i] for i in sorted(perm[n_test:]))
  return train, test


def in_context_persona(persona: str | None, shots: Sequence[Record]) -> str:
  """The ICL baseline's persona: the text persona followed by a few of the class's own examples."""
  parts = [persona.rstrip()] if persona else []
  if shots:
    parts.append("Examples of how this character writes:")
    parts.extend(f"{r.context}\n{r.text}" if r.context else r.text for r in shots)
  return "\n\n".join(parts) + "\n"


def pick_shots(train: Sequence[Record], shots: int, seed: int = 0) -> dict[str, list[Record]]:
  """`shots` training examples per class (seeded), for in-context prompts."""
  rng = np.random.default_rng(seed)
  out = {}
  for cls, rs in sorted(by_class(train).items()):
    out[cls] = [rs[i] for i in sorted(rng.permutation(len(rs))[:shots])]
  return out


class ClassVocab:
  """Stable class name <-> id mapping (names in the given order)."""

  def __init__(self, names: Iterable[str]):
    self.names = list(names)
    if len(set(self.names)) != len(self.names):
      raise DataError("class names must be unique")
    self.index = {n: i for i, n in enumerate(self.names)}

  def __len__(self):
    return len(self.names)

  def id(self, name: str) -> int:
    if name not in self.index:
      raise KeyError(f"unknown class {name!r}; known: {self.names[:5]}{'...' if len(self.names) > 5 else ''}")
    return self.index[name]


# --- templating and tokenization ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Example:
  prefix: np.ndarray  # int32, ends where the soft tokens go
  suffix: np.ndarray
  target: np.ndarray
  class_id: int

  def __len__(self):
    return len(self.prefix) + len(self.suffix) + len(self.target)


def render_chat(tokenizer, system: str, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
  """The tokenizer's chat template over a system message and `messages`; for
  templates without a system role (e.g. Gemma) the system text opens the first
  message instead."""
  msgs = [{"role": "system", "content": system}, *messages]
  try:
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
  except Exception:  # templates without a system role raise
    first = dict(msgs[1], content=system + "\n\n" + msgs[1]["content"])
    return tokenizer.apply_chat_template([first, *msgs[2:]], tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


class PromptFormatter:
  """Turns (persona, context, text) into token pieces around the soft slot.

  With a chat template (`use_chat_template` "auto" uses one when the
  tokenizer has it), the persona and the soft slot form the system message,
  the context (or `instruction`) the user message and the text the assistant
  reply; templates without a system role get the system part at the start of
  the user message. Otherwise `template` (which must contain `{soft}` and may
  use `{persona}` and `{context}`) is followed by the text and EOS.
  """

  def __init__(self, tokenizer, template: str = DEFAULT_TEMPLATE, use_chat_template: str | bool = "auto",
               instruction: str = DEFAULT_INSTRUCTION):
    if SOFT not in template:
      raise DataError(f"data.template {template!r} has no {SOFT} placeholder for the soft tokens")
    self.tok = tokenizer
    self.template = template
    self.instruction = instruction
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template in ("auto", None):
      self.chat = has_chat
    else:
      self.chat = use_chat_template in (True, "yes", "true", "1")
      if self.chat and not has_chat:
        raise DataError("data.use_chat_template is on, but the tokenizer has no chat template")
    self.eos = tokenizer.eos_token_id

  def _ids(self, s: str, special: bool = False) -> list[int]:
    return list(self.tok(s, add_special_tokens=special)["input_ids"]) if s or special else []

  def _render_chat(self, persona, context, with_text: bool) -> str:
    msgs = [{"role": "user", "content": context or self.instruction}]
    if with_text:
      msgs.append({"role": "assistant", "content": _TEXT_MARK})
    return self._render_messages(persona, msgs, with_text)

  def _render_messages(self, persona, messages, with_text: bool, system: str = "") -> str:
    """The chat template over `messages`, after a system message holding the
    persona, the soft slot and then `system`."""
    system = (persona or "") + _SOFT_MARK + (f"\n\n{system}" if system else "")
    return render_chat(self.tok, system, messages, add_generation_prompt=not with_text)

  def chat_pieces(self, persona: str | None, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """`(prefix, suffix)` token ids of a generation prompt for a conversation
    (`[{"role": "system" | "user" | "assistant", "content": str}, ...]`), the
    soft slot between them. One user message gives exactly `prompt_pieces`'
    prompt; system messages follow the persona and soft slot. Without a chat
    template, the non-system turns, one per line, are the context."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
    if not self.chat:
      return self.prompt_pieces(persona, "\n".join(m["content"] for m in turns))
    rendered = self._render_messages(persona, turns or [{"role": "user", "content": self.instruction}], False,
                                     system)
    before, after = rendered.split(_SOFT_MARK, 1)
    return self._ids(before), self._ids(after)

  def prompt_pieces(self, persona: str | None, context: str | None) -> tuple[list[int], list[int]]:
    """`(prefix, suffix)` token ids of a generation prompt (the soft slot between them)."""
    if self.chat:
      rendered = self._render_chat(persona, context, with_text=False)
      before, after = rendered.split(_SOFT_MARK, 1)
      return self._ids(before), self._ids(after)
    before, after = self.template.split(SOFT, 1)
    fill = dict(persona=persona or "", context=context or "")
    return self._ids(before.format(**fill), special=True), self._ids(after.format(**fill))

  def pieces(self, persona: str | None, context: str | None, text: str) -> tuple[list[int], list[int], list[int]]:
    """`(prefix, suffix, target)` token ids of a training example."""
    if self.chat:
      rendered = self._render_chat(persona, context, with_text=True)
      before, rest = rendered.split(_SOFT_MARK, 1)
      middle, end = rest.split(_TEXT_MARK, 1)
      end_ids = self._ids(end.rstrip())
      target = self._ids(text) + (end_ids or ([self.eos] if self.eos is not None else []))
      return self._ids(before), self._ids(middle), target
    prefix, suffix = self.prompt_pieces(persona, context)
    return prefix, suffix, self._ids(text) + ([self.eos] if self.eos is not None else [])


def encode(records: Sequence[Record], formatter: PromptFormatter, vocab: ClassVocab, max_len: int,
           counts: collections.Counter | None = None) -> list[Example]:
  """Tokenizes records; long examples lose context from the left, then target from the right.

  `max_len` is the budget of prefix + suffix + target tokens (soft tokens
  excluded). Truncations are counted in `counts`.
  """
  counts = counts if counts is not None else collections.Counter()
  out = []
  for r in records:
    prefix, suffix, target = formatter.pieces(r.persona, r.context, r.text)
    if len(prefix) >= max_len:
      raise DataError(f"class {r.cls!r}: the persona prompt alone has {len(prefix)} tokens; "
                      f"data.max_len={max_len} leaves no room for the text")
    room = max_len - len(prefix) - len(target)
    if room < len(suffix):
      counts["context truncated"] += 1
      suffix = suffix[len(suffix) - max(room, 0):] if room > 0 else []
    if len(prefix) + len(suffix) + len(target) > max_len:
      counts["target truncated"] += 1
      target = target[:max_len - len(prefix) - len(suffix)]
    out.append(Example(np.asarray(prefix, np.int32), np.asarray(suffix, np.int32),
                       np.asarray(target, np.int32), vocab.id(r.cls)))
  return out


def default_buckets(max_len: int, minimum: int = 16, fine: bool = False) -> tuple[int, ...]:
  """Padded lengths up to `max_len`: powers of two from `minimum`, and with `fine` the midpoints
  too (16, 24, 32, 48, 64, 96, ...: at most a third of a row is padding, for twice the shapes)."""
  out, b = [], minimum
  while b < max_len:
    out.append(b)
    if fine and b * 3 // 2 < max_len:
      out.append(b * 3 // 2)
    b *= 2
  return tuple(out) + (max_len,)


def buckets_for(examples: Sequence[Example], max_len: int) -> tuple[int, ...]:
  """`default_buckets` up to the longest of `examples` (rounded up to a multiple of 8), never past
  `max_len`: a batch is padded no longer than its data needs. (With `max_len` 96 and replies of
  at most 72 tokens, every batch holding a row over 64 was padded to 96; a 16-row SmolLM2 step
  took 17.0 s there against 14.6 s at 72.)"""
  longest = max((len(e) for e in examples), default=1)
  return default_buckets(min(max_len, -(-longest // 8) * 8))


def bucket_len(n: int, buckets: Sequence[int]) -> int:
  for b in sorted(buckets):
    if b >= n:
      return b
  return n


def collate(examples: Sequence[Example], batch_size: int, buckets: Sequence[int], pad_id: int = 0) -> dict:
  """Pads `examples` (at most `batch_size`) into one batch (see module docstring)."""
  if len(examples) > batch_size:
    raise ValueError(f"{len(examples)} examples do not fit a batch of {batch_size}")
  t = bucket_len(max((len(e) for e in examples), default=1), buckets)
  ids = np.full((batch_size, t), pad_id, np.int32)
  am = np.zeros((batch_size, t), np.int32)
  lm = np.zeros((batch_size, t), np.float32)
  si = np.zeros((batch_size,), np.int32)
  ci = np.zeros((batch_size,), np.int32)
  rows = []
  for r, e in enumerate(examples):
    seq = np.concatenate([e.prefix, e.suffix, e.target])
    ids[r, :len(seq)] = seq
    am[r, :len(seq)] = 1
    start = len(e.prefix) + len(e.suffix)
    lm[r, start:len(seq)] = 1.0
    si[r] = len(e.prefix)
    ci[r] = e.class_id
    rows.append(np.arange(max(start, 1), len(seq), dtype=np.int32))  # token 0 is never predicted
  m = min(t, bucket_len(max([len(x) for x in rows] + [1]), buckets))
  tg = np.zeros((batch_size, m), np.int32)
  for r, x in enumerate(rows):
    tg[r, :len(x)] = x
  return {"input_ids": ids, "attention_mask": am, "loss_mask": lm, "soft_index": si, "class_ids": ci,
          "targets": tg}


class ShuffledBatches:
  """Batches in a seeded order per epoch: batch `(epoch, index)` is always the same.

  This is what makes a resumed run replay exactly the batches it would have
  seen. The last partial batch is padded with empty rows (or dropped).
  With `num_shards > 1`, each process gets rows `shard::num_shards` of every
  global batch (multi-host data loading).

  With `micro_batch_size`, `micro_batches` gives each batch as micro-batches
  of that many rows: the batch's examples by decreasing length, each
  micro-batch padded only to its own bucket, so a large batch (a full-batch
  stage 2) runs in bounded memory with little padding.
  """

  def __init__(self, examples: Sequence[Example], batch_size: int, *, seed: int = 0,
               buckets: Sequence[int] = (), pad_id: int = 0, drop_last: bool = False, shuffle: bool = True,
               shard: int = 0, num_shards: int = 1, micro_batch_size: int = 0):
    if not examples:
      raise DataError("no examples to batch")
    self.examples, self.batch_size, self.seed = list(examples), batch_size or len(examples), seed
    self.buckets = tuple(buckets) or default_buckets(max(len(e) for e in examples))
    self.pad_id, self.drop_last, self.shuffle = pad_id, drop_last, shuffle
    self.shard, self.num_shards = shard, num_shards
    self.micro_batch_size = micro_batch_size if 0 < micro_batch_size < self.batch_size else 0
    # Each process reads its rows of every forward pass's batch.
    name, size = ("micro-batch size", self.micro_batch_size) if self.micro_batch_size else \
        ("batch size", self.batch_size)
    if size % num_shards:
      raise DataError(f"{name} {size} is not divisible by {num_shards} processes")

  def steps_per_epoch(self) -> int:
    n = len(self.examples)
    return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

  def _rows(self, epoch: int, index: int) -> list[Example]:
    n = len(self.examples)
    order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
    return [self.examples[i] for i in order[index * self.batch_size:(index + 1) * self.batch_size]]

  def _local(self, b: dict) -> dict:
    return {k: v[self.shard::self.num_shards] for k, v in b.items()} if self.num_shards > 1 else b

  def batch(self, epoch: int, index: int) -> dict:
    return self._local(collate(self._rows(epoch, index), self.batch_size, self.buckets, self.pad_id))

  def micro_batches(self, epoch: int, index: int) -> list[dict]:
    """Batch `(epoch, index)` as the micro-batches an update runs (one, without `micro_batch_size`)."""
    if not self.micro_batch_size:
      return [self.batch(epoch, index)]
    rows = sorted(self._rows(epoch, index), key=len, reverse=True)  # stable: a fixed order for equal lengths
    mb = self.micro_batch_size
    return [self._local(collate(rows[i:i + mb], mb, self.buckets, self.pad_id)) for i in range(0, len(rows), mb)]

  def all_batches(self) -> list[dict]:
    """Every batch of epoch 0 in order (for evaluation with shuffle=False)."""
    return [self.batch(0, i) for i in range(self.steps_per_epoch())]
