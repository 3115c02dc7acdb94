"""Synthetic persona corpus: determinism, schema, and that its hidden structure is real."""

import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from persomux import synthetic
from persomux.synthetic import SyntheticCorpusConfig

# 60 personas over 3**4 = 81 compositions: many pairs share 0, 1, 2 or 3 attributes.
STRUCTURED = SyntheticCorpusConfig(num_personas=60, examples_per_persona=40, num_attributes=4,
                                   values_per_attribute=3, seed=3)


def tokens(text):
  return re.findall(r"\w+|[^\w\s]+", text)


def bag_of_words(records, field="text"):
  """Count matrix `[records, vocab]` and class index per record."""
  vocab, names = {}, {}
  ids = [[vocab.setdefault(w, len(vocab)) for w in tokens(r[field])] for r in records]
  counts = np.zeros((len(records), len(vocab)))
  for row, doc in enumerate(ids):
    np.add.at(counts[row], doc, 1)
  labels = np.array([names.setdefault(r["class"], len(names)) for r in records])
  return counts, labels


def naive_bayes_accuracy(records, examples_per_persona, field="text", train=30):
  """Multinomial naive Bayes (add-one smoothing) trained on each persona's first `train` examples."""
  x, y = bag_of_words(records, field)
  is_train = np.arange(len(records)) % examples_per_persona < train
  counts = np.ones((y.max() + 1, x.shape[1]))
  np.add.at(counts, y[is_train], x[is_train])
  log_p = np.log(counts / counts.sum(1, keepdims=True))
  pred = (x[~is_train] @ log_p.T).argmax(1)
  return float((pred == y[~is_train]).mean())


@pytest.fixture(scope="module")
def structured_corpus():
  return synthetic.make_corpus(STRUCTURED)


def test_deterministic_for_a_seed_and_different_for_another():
  cfg = SyntheticCorpusConfig(num_personas=12, examples_per_persona=5)
  a, b = synthetic.make_corpus(cfg), synthetic.make_corpus(cfg)
  assert a == b
  other = synthetic.make_corpus(SyntheticCorpusConfig(num_personas=12, examples_per_persona=5, seed=1))
  assert sum(x["text"] != y["text"] for x, y in zip(a, other)) > 0.9 * len(a)
  # The hidden mapping itself changes with the seed.
  comp = (0, 1, 2, 3, 0)
  assert synthetic.describe_style(cfg, comp) != synthetic.describe_style(
      SyntheticCorpusConfig(seed=1), comp)


def test_more_personas_extend_the_same_population():
  small = synthetic.make_corpus(SyntheticCorpusConfig(num_personas=5, examples_per_persona=4))
  large = synthetic.make_corpus(SyntheticCorpusConfig(num_personas=9, examples_per_persona=4))
  assert large[:len(small)] == small


def test_default_demo_size_is_fast_and_valid():
  start = time.perf_counter()
  records = synthetic.make_corpus(SyntheticCorpusConfig())
  assert time.perf_counter() - start < 5.0
  assert len(records) == 220 * 40
  names = sorted({r["class"] for r in records})
  assert names == [f"persona_{i:04d}" for i in range(220)]
  for r in records:
    assert set(r) == {"class", "text", "context", "persona", "group"}
    assert isinstance(r["text"], str) and 10 <= len(r["text"].split()) <= 30
    assert isinstance(r["context"], str) and r["context"]
    assert r["persona"] is None and r["group"] is None
  # A modest vocabulary, so a tiny BPE and LM can model it.
  vocab = {w.lower() for r in records for w in tokens(r["context"] + " " + r["text"])}
  assert 150 < len(vocab) < 500
  comps = synthetic.persona_compositions(SyntheticCorpusConfig())
  assert len(set(comps.values())) == 220  # compositions are unique by default


def test_text_persona_options():
  cfg = SyntheticCorpusConfig(num_personas=3, examples_per_persona=2, persona_text="id")
  assert [r["persona"] for r in synthetic.make_corpus(cfg)][::2] == [
      "You are persona_0000.", "You are persona_0001.", "You are persona_0002."]
  cfg = SyntheticCorpusConfig(num_personas=30, examples_per_persona=1, persona_text="hint", hint_attribute=2)
  comps = synthetic.persona_compositions(cfg)
  hints = {}
  for r in synthetic.make_corpus(cfg):
    m = re.fullmatch(r"You are (persona_\d{4})\. Your trait C is (\w+)\.", r["persona"])
    assert m and m.group(1) == r["class"]
    hints.setdefault(comps[r["class"]][2], set()).add(m.group(2))
  # The hint names exactly the value of the hinted attribute.
  assert all(len(words) == 1 for words in hints.values())
  assert len({w for words in hints.values() for w in words}) == len(hints)


def test_bag_of_words_identifies_personas_and_contexts_do_not(structured_corpus):
  chance = 1 / STRUCTURED.num_personas
  assert naive_bayes_accuracy(structured_corpus, STRUCTURED.examples_per_persona) > 0.6
  # Contexts are drawn independently of the persona: they carry no signal.
  assert naive_bayes_accuracy(structured_corpus, STRUCTURED.examples_per_persona, "context") < 4 * chance


def test_personas_sharing_attributes_share_style(structured_corpus):
  x, y = bag_of_words(structured_corpus)
  profiles = np.zeros((y.max() + 1, x.shape[1]))
  np.add.at(profiles, y, x)
  profiles /= np.linalg.norm(profiles, axis=1, keepdims=True)
  similarity = profiles @ profiles.T
  # bag_of_words numbers classes in order of first appearance: persona_0000, ...
  comps = np.array(list(synthetic.persona_compositions(STRUCTURED).values()))
  shared = (comps[:, None, :] == comps[None, :, :]).sum(-1)
  upper = np.triu_indices(len(comps), 1)
  by_shared = [similarity[upper][shared[upper] == k].mean() for k in range(STRUCTURED.num_attributes)]
  assert all(a < b for a, b in zip(by_shared, by_shared[1:])), by_shared
  # The same holds for the hidden styles themselves (fraction of equal preferred options).
  styles = [synthetic.describe_style(STRUCTURED, tuple(int(v) for v in c)) for c in comps]
  agree = np.array([[np.mean([s[k] == t[k] for k in s]) for t in styles] for s in styles])
  by_shared = [agree[upper][shared[upper] == k].mean() for k in range(STRUCTURED.num_attributes)]
  assert all(a < b for a, b in zip(by_shared, by_shared[1:])), by_shared


def test_same_composition_same_style_distribution():
  # 2 attributes x 2 values and 12 personas: compositions must repeat.
  cfg = SyntheticCorpusConfig(num_personas=12, examples_per_persona=300, num_attributes=2,
                              values_per_attribute=2, unique_compositions=False)
  comps = list(synthetic.persona_compositions(cfg).values())
  records = synthetic.make_corpus(cfg)
  x, y = bag_of_words(records)
  profiles = np.zeros((len(comps), x.shape[1]))
  np.add.at(profiles, y, x)
  profiles /= profiles.sum(1, keepdims=True)
  same, different = [], []
  for i in range(len(comps)):
    for j in range(i + 1, len(comps)):
      distance = np.abs(profiles[i] - profiles[j]).sum()
      if comps[i] == comps[j]:
        same.append(distance)
        assert synthetic.describe_style(cfg, comps[i]) == synthetic.describe_style(cfg, comps[j])
        # Same distribution, independent draws.
        texts_i = [r["text"] for r in records if r["class"] == f"persona_{i:04d}"]
        texts_j = [r["text"] for r in records if r["class"] == f"persona_{j:04d}"]
        assert texts_i != texts_j
      else:
        different.append(distance)
  assert same and different
  assert max(same) < min(different), (max(same), min(different))


def test_write_jsonl_and_population_text(tmp_path):
  records = synthetic.make_corpus(SyntheticCorpusConfig(num_personas=3, examples_per_persona=4))
  path = tmp_path / "sub" / "records.jsonl"
  synthetic.write_jsonl(records, path)
  assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == records
  texts = synthetic.population_text(records)
  assert texts == [f"{r['context']}\n{r['text']}" for r in records]
  assert synthetic.population_text([{"class": "a", "text": "hi there"}]) == ["hi there"]


@pytest.mark.parametrize("kwargs, field", [
    ({"num_personas": 0}, "num_personas"),
    ({"num_personas": 17, "num_attributes": 2, "values_per_attribute": 2}, "num_personas"),
    ({"persona_text": "full"}, "persona_text"),
    ({"hint_attribute": 5}, "hint_attribute"),
    ({"values_per_attribute": 1}, "values_per_attribute"),
    ({"style_strength": 1.5}, "style_strength"),
])
def test_bad_config_names_the_field(kwargs, field):
  with pytest.raises(ValueError, match=rf"SyntheticCorpusConfig\.{field}: expected"):
    SyntheticCorpusConfig(**kwargs)


def test_describe_style_rejects_a_bad_composition():
  with pytest.raises(ValueError, match=r"composition: expected 5 ints in \[0, 4\)"):
    synthetic.describe_style(SyntheticCorpusConfig(), (0, 1, 4, 0, 0))


def test_import_needs_neither_torch_nor_jax():
  code = "import sys, persomux.synthetic; print('torch' in sys.modules or 'jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
