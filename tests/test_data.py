"""Records, splits, templating, tokenization and batching."""

import collections

import numpy as np
import pytest

from persomux import data as D
from persomux.tokenizer import train_bpe_tokenizer

TEXTS = ["hello there, how are you", "the harbor is calm today", "i like the market in the morning",
         "You are a sailor.", "what do you think?"] * 4


@pytest.fixture(scope="module")
def tok():
  return train_bpe_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def chat_tok():
  return train_bpe_tokenizer(TEXTS, vocab_size=300, chat_template=True)


def _records(n_classes=10, per_class=6, groups=None):
  out = []
  for c in range(n_classes):
    for i in range(per_class):
      out.append({"class": f"c{c}", "text": f"line {i} of c{c}", "context": f"ctx {i}",
                  "persona": None, "group": groups[c] if groups else None})
  return out


def test_reads_jsonl_csv_parquet(tmp_path):
  import pandas as pd

  rows = _records(3, 2)
  D.write_jsonl(rows, str(tmp_path / "a.jsonl"))
  pd.DataFrame(rows).to_csv(tmp_path / "b.csv", index=False)
  pd.DataFrame(rows).to_parquet(tmp_path / "c.parquet")
  for name in ("a.jsonl", "b.csv", "c.parquet"):
    recs, skipped = D.load_records(str(tmp_path / name))
    assert [(r.cls, r.text, r.context) for r in recs] == [(r["class"], r["text"], r["context"]) for r in rows]
    assert recs[0].persona is None and not skipped


def test_missing_optional_columns_and_counted_skips(tmp_path):
  p = tmp_path / "x.jsonl"
  p.write_text('{"class": "a", "text": "hi"}\n{"class": "a", "text": ""}\n{"class": "b", "text": "yo"}\n')
  recs, skipped = D.load_records(str(p))
  assert [r.cls for r in recs] == ["a", "b"] and recs[0].context is None
  assert skipped == collections.Counter({"empty text": 1})


def test_bad_inputs_raise_clear_errors(tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(D.DataError, match="empty.jsonl: file is empty"):
    D.load_records(str(empty))
  notext = tmp_path / "notext.jsonl"
  notext.write_text('{"class": "a", "context": "x"}\n')
  with pytest.raises(D.DataError, match="notext.jsonl: missing field 'text'"):
    D.load_records(str(notext))
  blank = tmp_path / "blank.jsonl"
  blank.write_text('{"class": "a", "text": ""}\n')
  with pytest.raises(D.DataError, match="dataset is empty"):
    D.load_records(str(blank))
  with pytest.raises(D.DataError, match="no such file"):
    D.load_records(str(tmp_path / "missing.jsonl"))
  recs = [D.Record(**{("cls" if k == "class" else k): v for k, v in r.items()}) for r in _records(2, 2)]
  with pytest.raises(D.DataError, match="class 'c9' has no examples"):
    D.select_classes(recs, ["c0", "c9"])
  with pytest.raises(D.DataError, match=r"classes \['c1'\] also appear in pretraining"):
    D.check_disjoint(["c0", "c1"], ["c1", "c2"])


def _as_records(rows):
  return [D.Record(r["class"], r["text"], r["context"], r["persona"], r["group"]) for r in rows]


@pytest.mark.parametrize("seed", range(5))
def test_groups_never_straddle_and_fraction_is_about_right(seed):
  groups = [f"movie{c // 3}" for c in range(30)]  # 10 movies, 3 characters each
  recs = _as_records(_records(30, 10, groups))
  pre, fine = D.split_classes(recs, 0.1, seed)
  assert pre and fine and not set(pre) & set(fine)
  side = {c: "pre" for c in pre} | {c: "fine" for c in fine}
  for g in set(groups):
    assert len({side[f"c{c}"] for c in range(30) if groups[c] == g}) == 1
  share = sum(r.cls in fine for r in recs) / len(recs)
  assert 0.05 <= share <= 0.2
  assert D.split_classes(recs, 0.1, seed) == (pre, fine)


def test_per_class_train_test_split_keeps_train():
  recs = _as_records(_records(3, 10)) + [D.Record("solo", "only one")]
  train, test = D.split_train_test(recs, 0.2, seed=0)
  per = collections.Counter(r.cls for r in test)
  assert per == {"c0": 2, "c1": 2, "c2": 2}
  assert any(r.cls == "solo" for r in train)
  assert len(D.cap_per_class(recs, 4)) == 3 * 4 + 1


def test_soft_slot_after_persona_or_after_bos(tok):
  fmt = D.PromptFormatter(tok)
  pre, suf, tgt = fmt.pieces("You are a sailor.", "what do you think?", "the harbor is calm")
  assert pre[0] == tok.bos_token_id and tok.decode(pre, skip_special_tokens=True) == "You are a sailor."
  assert tok.decode(suf) == "\nwhat do you think?\n"
  assert tgt[-1] == tok.eos_token_id and tok.decode(tgt[:-1]) == "the harbor is calm"
  pre, _, _ = fmt.pieces(None, "hi", "yo")
  assert pre == [tok.bos_token_id]  # no persona: soft tokens right after BOS
  with pytest.raises(D.DataError, match="no {soft} placeholder"):
    D.PromptFormatter(tok, template="{persona}\n{context}")


def test_chat_template_pieces(chat_tok):
  fmt = D.PromptFormatter(chat_tok)
  assert fmt.chat
  pre, suf, tgt = fmt.pieces("You are a sailor.", "what do you think?", "calm")
  assert chat_tok.decode(pre) == "<bos><|system|>\nYou are a sailor."
  assert chat_tok.decode(suf).startswith("<|end|>\n<|user|>\nwhat do you think?<|end|>\n<|assistant|>\n")
  assert chat_tok.decode(tgt) == "calm<|end|>"
  assert pre.count(chat_tok.bos_token_id) == 1
  gen_pre, gen_suf = fmt.prompt_pieces("You are a sailor.", "what do you think?")
  assert gen_pre == pre and chat_tok.decode(gen_suf).endswith("<|assistant|>\n")


def test_encode_truncates_context_from_left_and_keeps_target(tok):
  fmt = D.PromptFormatter(tok)
  vocab = D.ClassVocab(["a"])
  long_ctx = " ".join(["hello there"] * 40)
  counts = collections.Counter()
  (ex,) = D.encode([D.Record("a", "the harbor is calm today", long_ctx)], fmt, vocab, 24, counts)
  full_target = fmt.pieces(None, long_ctx, "the harbor is calm today")[2]
  assert len(ex) == 24 and ex.target.tolist() == full_target
  assert counts["context truncated"] == 1
  full_suffix = fmt.pieces(None, long_ctx, "x")[1]
  assert ex.suffix.tolist() == full_suffix[len(full_suffix) - len(ex.suffix):]  # kept the end


def test_batches_masks_buckets_and_resume(tok):
  fmt = D.PromptFormatter(tok)
  recs = _as_records(_records(4, 5))
  vocab = D.ClassVocab(sorted({r.cls for r in recs}))
  exs = D.encode(recs, fmt, vocab, 64)
  src = D.ShuffledBatches(exs, 6, seed=3, buckets=(16, 32, 64))
  assert src.steps_per_epoch() == 4  # 20 examples, last batch padded
  b = src.batch(0, 0)
  assert b["input_ids"].shape[1] in (16, 32, 64)
  for r in range(6):
    n = int(b["attention_mask"][r].sum())
    target = np.nonzero(b["loss_mask"][r])[0]
    assert target[-1] == n - 1 and b["input_ids"][r, n - 1] == tok.eos_token_id
    assert b["soft_index"][r] == 1  # no persona
  last = src.batch(0, 3)
  assert last["attention_mask"][2:].sum() == 0 and last["loss_mask"][2:].sum() == 0
  again = D.ShuffledBatches(exs, 6, seed=3, buckets=(16, 32, 64))
  for e, i in [(0, 2), (1, 0), (2, 3)]:
    for k in b:
      np.testing.assert_array_equal(src.batch(e, i)[k], again.batch(e, i)[k])
  assert not np.array_equal(src.batch(0, 0)["class_ids"], src.batch(1, 0)["class_ids"]) or \
      not np.array_equal(src.batch(0, 0)["input_ids"], src.batch(1, 0)["input_ids"])
  seen = collections.Counter()
  for i in range(src.steps_per_epoch()):
    bt = src.batch(5, i)
    seen.update(bt["class_ids"][bt["attention_mask"].sum(1) > 0].tolist())
  assert seen == collections.Counter({i: 5 for i in range(4)})  # every example once per epoch


def _varied(n=23, seed=0):
  r = np.random.RandomState(seed)
  ids = lambda k: r.randint(3, 50, k).astype(np.int32)
  return [D.Example(ids(1 + r.randint(3)), ids(r.randint(20)), ids(1 + r.randint(12)), i % 4) for i in range(n)]


def test_targets_list_every_loss_position_in_order():
  exs = _varied()
  b = D.collate(exs[:6], 8, (8, 16, 32, 64))
  t, m = b["input_ids"].shape[1], b["targets"].shape[1]
  assert m < t and m in (8, 16, 32)
  for r in range(8):
    want = np.nonzero(b["loss_mask"][r] * (np.arange(t) > 0))[0]
    got = b["targets"][r]
    np.testing.assert_array_equal(got[:len(want)], want)
    assert (got[len(want):] == 0).all()


@pytest.mark.parametrize("num_shards", [1, 2])
def test_micro_batches_split_a_batch_by_length(num_shards):
  """Micro-batches hold exactly the batch's rows, longest first, each padded only to its own bucket;
  every process gets its rows of every micro-batch."""
  exs = _varied()
  local = [D.ShuffledBatches(exs, 10, seed=1, buckets=(8, 16, 32), micro_batch_size=4, shard=s,
                             num_shards=num_shards) for s in range(num_shards)]
  whole = D.ShuffledBatches(exs, 10, seed=1, buckets=(8, 16, 32))
  assert local[0].steps_per_epoch() == 3
  for e, i in [(0, 0), (1, 2)]:
    parts = [src.micro_batches(e, i) for src in local]
    assert len({len(p) for p in parts}) == 1
    rows = [(tuple(mb["input_ids"][r][mb["attention_mask"][r] > 0]), int(mb["class_ids"][r]))
            for p in parts for mb in p for r in range(len(mb["input_ids"])) if mb["attention_mask"][r].sum()]
    ref = whole.batch(e, i)
    want = [(tuple(ref["input_ids"][r][ref["attention_mask"][r] > 0]), int(ref["class_ids"][r]))
            for r in range(10) if ref["attention_mask"][r].sum()]
    assert sorted(rows) == sorted(want)
    for j in range(len(parts[0])):
      shapes = {p[j]["input_ids"].shape for p in parts}
      assert len(shapes) == 1 and next(iter(shapes))[0] == 4 // num_shards  # the same shape on every process
    lengths = [p[j]["attention_mask"].sum(1).max() for p in parts[:1] for j in range(len(p))]
    assert lengths == sorted(lengths, reverse=True)
    widths = [p[0]["input_ids"].shape[1] for p in zip(*parts)]
    assert widths[-1] <= widths[0] and (widths[0] == ref["input_ids"].shape[1])
  with pytest.raises(D.DataError, match="micro-batch size 3 is not divisible by 2 processes"):
    D.ShuffledBatches(exs, 10, micro_batch_size=3, num_shards=2)


def test_buckets_stop_at_the_longest_example():
  """A batch is padded no longer than its longest row needs (rounded up to 8), never past
  max_len: rows of at most 70 tokens under max_len 96 pad to 72, not 96."""
  ex = lambda n: D.Example(np.ones(1, np.int32), np.zeros(0, np.int32), np.ones(n - 1, np.int32), 0)
  assert D.buckets_for([ex(10), ex(50), ex(70)], 96) == (16, 32, 64, 72)
  assert D.buckets_for([ex(10), ex(64)], 96) == (16, 32, 64)
  assert D.buckets_for([ex(95)], 96) == (16, 32, 64, 96)
  src = D.ShuffledBatches([ex(10), ex(50), ex(70)], 3, buckets=D.buckets_for([ex(10), ex(50), ex(70)], 96))
  assert src.batch(0, 0)["input_ids"].shape == (3, 72)
