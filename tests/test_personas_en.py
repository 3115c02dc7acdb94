"""English persona population: determinism, schema, natural-looking replies, and identifiable hidden styles."""

import collections
import re
import subprocess
import sys

import numpy as np
import pytest

from persomux import personas_en
from persomux.personas_en import PersonaPopulationConfig

# 40 personas x 40 examples; the classifier trains on 20 replies per persona.
IDENTIFY = PersonaPopulationConfig(num_personas=40, examples_per_persona=40, seed=7)


def tokens(text):
  """Lower-cased words and punctuation runs, so "!" and "..." and ":D" are features."""
  return re.findall(r"\w+|[^\w\s]+", text.lower())


def bag_of_words(records, field):
  """Count matrix `[records, vocab]` and class index per record (classes in order of first appearance)."""
  vocab, names = {}, {}
  ids = [[vocab.setdefault(w, len(vocab)) for w in tokens(r[field])] for r in records]
  counts = np.zeros((len(records), len(vocab)))
  for row, doc in enumerate(ids):
    np.add.at(counts[row], doc, 1)
  labels = np.array([names.setdefault(r["class"], len(names)) for r in records])
  return counts, labels


def naive_bayes_accuracy(records, examples_per_persona, field="text", train=20):
  """Multinomial naive Bayes (add-one smoothing) trained on each persona's first `train` examples."""
  x, y = bag_of_words(records, field)
  is_train = np.arange(len(records)) % examples_per_persona < train
  counts = np.ones((y.max() + 1, x.shape[1]))
  np.add.at(counts, y[is_train], x[is_train])
  log_p = np.log(counts / counts.sum(1, keepdims=True))
  pred = (x[~is_train] @ log_p.T).argmax(1)
  return float((pred == y[~is_train]).mean())


def by_persona(records):
  out = collections.defaultdict(list)
  for r in records:
    out[r["class"]].append(r["text"])
  return out


@pytest.fixture(scope="module")
def default_corpus():
  return personas_en.make_corpus(PersonaPopulationConfig())


def test_deterministic_for_a_seed_and_different_for_another():
  cfg = PersonaPopulationConfig(num_personas=12, examples_per_persona=5)
  a, b = personas_en.make_corpus(cfg), personas_en.make_corpus(cfg)
  assert a == b
  other = personas_en.make_corpus(PersonaPopulationConfig(num_personas=12, examples_per_persona=5, seed=1))
  assert sum(x["text"] != y["text"] for x, y in zip(a, other)) > 0.9 * len(a)
  # The hidden mapping itself changes with the seed.
  comp = (0, 1, 2, 0, 1, 2)
  styles = [personas_en.describe_style(PersonaPopulationConfig(seed=s), comp) for s in range(3)]
  assert styles[0] != styles[1] and styles[0] != styles[2]


def test_more_personas_extend_the_same_population():
  small = personas_en.make_corpus(PersonaPopulationConfig(num_personas=5, examples_per_persona=4))
  large = personas_en.make_corpus(PersonaPopulationConfig(num_personas=9, examples_per_persona=4))
  assert large[:len(small)] == small


def test_default_population_is_valid(default_corpus):
  cfg = PersonaPopulationConfig()
  assert len(default_corpus) == 300 * 40
  assert sorted({r["class"] for r in default_corpus}) == [f"persona_{i:04d}" for i in range(300)]
  contexts = {c.text for c in personas_en.CONTEXTS}
  assert 30 <= len(contexts) <= 60
  for r in default_corpus:
    assert set(r) == {"class", "text", "context", "persona", "group"}
    assert cfg.min_words <= len(r["text"].split()) <= cfg.max_words, r["text"]
    assert r["context"] in contexts
    assert r["persona"] is None and r["group"] is None
  # Every context is used, and replies are rarely copies of each other.
  assert {r["context"] for r in default_corpus} == contexts
  texts = [r["text"] for r in default_corpus]
  assert len(set(texts)) > 0.9 * len(texts)


def test_replies_are_clean_text(default_corpus):
  for r in default_corpus:
    t = r["text"]
    assert "{" not in t and "}" not in t and "  " not in t and " ," not in t and t == t.strip(), t
    assert not re.search(r"\b[Aa] [aeiouAEIOU]", t), t  # a/an agreement
    assert not re.search(r"\b[Aa]n (?!hour)[b-df-hj-np-tv-zB-DF-HJ-NP-TV-Z]", t), t
    assert re.search(r"[.!?)DP^]$", t), t


def test_hidden_style_shows_in_the_text():
  cfg = PersonaPopulationConfig(num_personas=60, examples_per_persona=30)
  texts = by_persona(personas_en.make_corpus(cfg))
  emoticon = re.compile("|".join(re.escape(e) for e in personas_en.EMOTICONS))
  seen = collections.Counter()
  for name, replies in texts.items():
    style = personas_en.describe_style(cfg, name)
    bodies = [emoticon.sub("", t) for t in replies]
    if style["casing"] == "lowercase":
      assert all(b == b.lower() for b in bodies), name
      seen["lowercase"] += 1
    else:
      assert sum(b != b.lower() for b in bodies) == len(bodies), name
    if style["emoticon_rate"] == 0.0:
      assert not any(emoticon.search(t) for t in replies), name
      seen["no emoticon"] += 1
    # Most replies mention the preferred hobby or close with the signature closer.
    topic, activities, things = personas_en.INTERESTS[style["interest"]]
    hobby = [topic, *activities, *things]
    if style["closer_rate"] == 0.85:
      seen["closer"] += 1
      assert sum(style["closer"].lower()[:-1] in t.lower() for t in replies) > 0.5 * len(replies), name
    if style["length"] == "long":
      seen["long"] += 1
      assert sum(any(h.lower() in t.lower() for h in hobby) for t in replies) > 0.5 * len(replies), name
  assert min(seen.values()) > 3, seen


def test_bag_of_words_identifies_personas_and_contexts_do_not():
  records = personas_en.make_corpus(IDENTIFY)
  chance = 1 / IDENTIFY.num_personas
  assert naive_bayes_accuracy(records, IDENTIFY.examples_per_persona) > 0.5
  # Contexts are drawn independently of the persona: they carry no signal.
  assert naive_bayes_accuracy(records, IDENTIFY.examples_per_persona, "context") < 3 * chance


def test_same_composition_same_style_distribution():
  # 2 attributes x 2 values and 12 personas: compositions must repeat.
  cfg = PersonaPopulationConfig(num_personas=12, examples_per_persona=300, num_attributes=2,
                                values_per_attribute=2, unique_compositions=False)
  comps = list(personas_en.persona_compositions(cfg).values())
  records = personas_en.make_corpus(cfg)
  x, y = bag_of_words(records, "text")
  profiles = np.zeros((len(comps), x.shape[1]))
  np.add.at(profiles, y, x)
  profiles /= profiles.sum(1, keepdims=True)
  same, different = [], []
  for i in range(len(comps)):
    for j in range(i + 1, len(comps)):
      distance = np.abs(profiles[i] - profiles[j]).sum()
      if comps[i] == comps[j]:
        same.append(distance)
        assert personas_en.describe_style(cfg, i) == personas_en.describe_style(cfg, j)
        assert records[i * 300:(i + 1) * 300] != records[j * 300:(j + 1) * 300]  # independent draws
      else:
        different.append(distance)
  assert same and different
  assert max(same) < min(different), (max(same), min(different))


def test_vague_text_persona_depends_on_one_attribute():
  cfg = PersonaPopulationConfig(num_personas=80, examples_per_persona=2, persona_text="vague")
  comps = personas_en.persona_compositions(cfg)
  texts = {r["class"]: r["persona"] for r in personas_en.make_corpus(cfg)}
  assert set(texts.values()) <= set(personas_en.VAGUE_TEXTS["length"].values())
  assert 1 < len(set(texts.values())) <= cfg.values_per_attribute
  # One attribute determines the text; no other attribute alone does.
  determines = [a for a in range(cfg.num_attributes)
                if all(len({texts[n] for n in comps if comps[n][a] == v}) == 1
                       for v in range(cfg.values_per_attribute))]
  assert len(determines) == 1
  for name, text in texts.items():
    assert text == personas_en.vague_text(cfg, personas_en.describe_style(cfg, name))
  stance = PersonaPopulationConfig(num_personas=3, examples_per_persona=1, persona_text="vague", vague_factor="stance")
  assert all(r["persona"] in personas_en.VAGUE_TEXTS["stance"].values() for r in personas_en.make_corpus(stance))


def test_describe_style_by_name_index_or_composition():
  cfg = PersonaPopulationConfig(num_personas=5)
  comp = personas_en.persona_compositions(cfg)["persona_0003"]
  style = personas_en.describe_style(cfg, 3)
  assert style == personas_en.describe_style(cfg, "persona_0003") == personas_en.describe_style(cfg, comp)
  assert style["register"] in personas_en.REGISTERS and style["stance"] in personas_en.STANCES
  with pytest.raises(ValueError, match=r"persona: expected an index in \[0, 5\)"):
    personas_en.describe_style(cfg, 5)
  with pytest.raises(ValueError, match=r"composition: expected 6 ints in \[0, 4\)"):
    personas_en.describe_style(cfg, (0, 1, 4, 0, 0, 0))


def test_sample_replies_answer_a_given_context():
  cfg = PersonaPopulationConfig(num_personas=4)
  replies = personas_en.sample_replies(cfg, 2, "How was your day?", n=5)
  assert replies == personas_en.sample_replies(cfg, "persona_0002", "How was your day?", n=5)
  assert len(set(replies)) == 5 and all(8 <= len(t.split()) <= 60 for t in replies)
  assert replies != personas_en.sample_replies(cfg, 2, "How was your day?", n=5, seed=1)
  with pytest.raises(ValueError, match=r"context: expected one of personas_en.CONTEXTS"):
    personas_en.sample_replies(cfg, 0, "Hello?")


@pytest.mark.parametrize("kwargs, field", [
    ({"num_personas": 0}, "num_personas"),
    ({"examples_per_persona": 0}, "examples_per_persona"),
    ({"num_personas": 17, "num_attributes": 2, "values_per_attribute": 2}, "num_personas"),
    ({"num_attributes": 9}, "num_attributes"),
    ({"values_per_attribute": 1}, "values_per_attribute"),
    ({"style_strength": 1.5}, "style_strength"),
    ({"pair_fraction": -0.1}, "pair_fraction"),
    ({"persona_text": "full"}, "persona_text"),
    ({"vague_factor": "interest"}, "vague_factor"),
    ({"min_words": 0}, "min_words"),
    ({"max_words": 20}, "max_words"),
])
def test_bad_config_names_the_field(kwargs, field):
  with pytest.raises(ValueError, match=rf"PersonaPopulationConfig\.{field}: expected"):
    PersonaPopulationConfig(**kwargs)


def test_import_needs_neither_torch_nor_jax():
  code = "import sys, persomux.personas_en; print('torch' in sys.modules or 'jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
