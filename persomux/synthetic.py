"""A synthetic persona corpus with hidden compositional structure (offline, seeded).

Used by the embedded demo, in the spirit of the APM benchmark's arbitrary
preference mappings: personas have latent attributes, and a random mapping
that no other code knows turns attribute values into observable style, so a
persona can only be learned from its examples.

Generative process (everything is a function of `SyntheticCorpusConfig.seed`):

1. Latent attributes. There are `num_attributes` attributes with
   `values_per_attribute` values each. Persona i (named `persona_0000`,
   `persona_0001`, ...; the name reveals nothing) draws one value per
   attribute, its *composition*. By default compositions are distinct.
2. The hidden mapping (the *world*). About 30 style factors, each with a small
   set of options:
   - word choice: a preferred synonym in each of 17 synonym sets
     ("big/large/huge/vast/grand", "think/believe/feel/reckon/suppose", ...);
   - outlook: the preferred adjective concept (good, old, busy, cold, ...);
   - topics: a primary and a secondary theme whose nouns the persona mentions
     (sea: gulls, waves, ...; music: songs, bells, ...);
   - sentence shape: the preferred template family (short statements, long
     two-clause statements, questions, inverted word order) and the preferred
     number of sentences;
   - punctuation: statement end mark (`.` `!` `...`), question mark
     (`?` `?!` `??`), clause separator (`,` `;` ` -`), casing (all lower
     case or capitalized sentences);
   - catchphrases: an opener ("honestly,") and a closer ("mark my words")
     with their rates of use.
   Each factor is controlled by one attribute, or (a `pair_fraction` of them)
   jointly by two, through a random table from the controlling values to an
   option. Every attribute controls several factors; two-attribute factors
   make a persona's style a composition that no single attribute explains.
   The persona's *style* is the tuple of preferred options: a deterministic
   function of its composition, so personas with the same composition have
   the same style distribution (`describe_style`).
3. Examples. A context is a persona-independent question about one of 20
   topics ("Tell me about the harbor."). The reply (10-30 words) is an
   optional opener, 1-4 sentences from template families with slots filled by
   synonym sets, theme nouns and the context's topic, and an optional closer.
   Each choice follows the persona's preferred option with probability
   `style_strength`, otherwise it is uniform over all options.

The vocabulary is about 300 distinct words, so a small byte-level BPE and a
tiny LM can model the population on a CPU. Generating the default corpus
(220 personas x 40 examples) takes well under a second.

Records follow the core data format: `class` (persona name), `text` (the
reply), `context`, `persona` (None by default) and `group` (None).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Any, Iterable, NamedTuple

TOPICS = ("harbor", "market", "forest", "river", "castle", "garden", "library", "mountain", "village",
          "bridge", "tower", "festival", "station", "bakery", "lighthouse", "meadow", "chapel", "mill",
          "square", "orchard")

CONTEXT_TEMPLATES = ("Tell me about the {t}.", "What do you think of the {t}?", "Have you been to the {t} lately?",
                     "Describe the {t} for me.", "How is the {t} these days?", "Any news from the {t}?",
                     "What is the {t} like?", "Would you visit the {t}?")

SYNONYMS = {
    "GOOD": ("good", "fine", "great", "lovely", "splendid"),
    "BIG": ("big", "large", "huge", "vast", "grand"),
    "SMALL": ("small", "little", "tiny", "modest", "humble"),
    "OLD": ("old", "ancient", "aged", "weathered", "worn"),
    "QUIET": ("quiet", "calm", "still", "peaceful", "silent"),
    "BUSY": ("busy", "crowded", "lively", "bustling", "noisy"),
    "BRIGHT": ("bright", "sunny", "shining", "golden", "radiant"),
    "COLD": ("cold", "chilly", "cool", "frosty", "bleak"),
    "VERY": ("very", "really", "truly", "quite", "rather"),
    "THINK": ("think", "believe", "feel", "reckon", "suppose"),
    "SEE": ("see", "notice", "spot", "watch", "find"),
    "LIKE": ("like", "love", "enjoy", "adore", "prefer"),
    "WALK": ("walk", "stroll", "wander", "roam", "hurry"),
    "ALWAYS": ("always", "often", "usually", "sometimes", "rarely"),
    "PEOPLE": ("people", "folks", "visitors", "locals", "neighbors"),
    "TIME": ("morning", "evening", "night", "afternoon", "dawn"),
    "NEAR": ("near", "beside", "by", "around", "behind"),
}
ADJECTIVES = ("GOOD", "BIG", "SMALL", "OLD", "QUIET", "BUSY", "BRIGHT", "COLD")

THEMES = {
    "sea": ("gulls", "waves", "boats", "nets", "shells"),
    "food": ("bread", "cheese", "apples", "pies", "soups"),
    "music": ("songs", "bells", "drums", "fiddles", "choirs"),
    "weather": ("clouds", "winds", "rains", "storms", "mists"),
    "animals": ("cats", "horses", "dogs", "geese", "goats"),
    "craft": ("tools", "ropes", "stones", "barrels", "carts"),
    "light": ("lamps", "candles", "stars", "lanterns", "fires"),
    "plants": ("roses", "trees", "ferns", "vines", "reeds"),
}

# Slots: {T} the context's topic, {H} a theme noun, {ADJ}/{ADJ2} adjectives,
# {SEP} the clause separator, other {NAME}s are synonym sets. The end mark is
# appended by the renderer ("question" sentences take the question mark).
TEMPLATE_FAMILIES = {
    "plain": ("the {T} is {VERY} {ADJ}", "i {LIKE} the {T} and its {H}", "the {H} {NEAR} the {T} are {ADJ}",
              "the {PEOPLE} {LIKE} the {T}"),
    "long": ("i {THINK} the {T} is {VERY} {ADJ}{SEP} and the {PEOPLE} {ALWAYS} {WALK} {NEAR} it in the {TIME}",
             "in the {TIME} the {T} is {ADJ}{SEP} and the {H} there are {VERY} {ADJ2}",
             "when the {PEOPLE} {WALK} {NEAR} the {T}{SEP} they {ALWAYS} {SEE} the {H}",
             "i {ALWAYS} {SEE} {ADJ} {H} {NEAR} the {T} in the {TIME}"),
    "question": ("is the {T} not {VERY} {ADJ}", "did you {SEE} the {H} {NEAR} the {T}",
                 "do you {LIKE} the {T} in the {TIME}", "who does not {LIKE} the {ADJ} {H}"),
    "inverted": ("{VERY} {ADJ} is the {T}", "{ADJ} {H} {NEAR} the {T}{SEP} {VERY} {ADJ2} they are",
                 "{ALWAYS} to the {T} the {PEOPLE} {WALK}", "the {T}{SEP} {VERY} {ADJ} it is"),
}

OPENERS = ("well,", "oh,", "honestly,", "listen,", "ah,", "hmm,", "you know,", "right,", "look,", "alas,", "ha,",
           "say,", "friend,", "aye,")
CLOSERS = ("that is all", "mark my words", "or so they say", "no doubt", "just saying", "believe me",
           "and so it goes", "as ever", "take care", "who knows", "you will see", "nothing more")

# Opaque names used only by the optional "hint" text persona.
_TRAIT_LETTERS = "ABCDEFGH"
_VALUE_WORDS = ("amber", "cobalt", "crimson", "jade", "ivory", "slate", "violet", "ochre")
_PERSONA_TEXT = ("none", "id", "hint")


@dataclasses.dataclass(frozen=True)
class SyntheticCorpusConfig:
  """What to generate.

  Attributes:
    num_personas: number of personas (classes), named `persona_0000`, ...
    examples_per_persona: context -> reply records per persona.
    num_attributes: latent attributes per persona, 1 to 8.
    values_per_attribute: values of each attribute, 2 to 8.
    seed: seeds the hidden mapping, the compositions and the examples.
    style_strength: probability in [0, 1] that a choice follows the persona's
      preferred option (else it is uniform over the options).
    pair_fraction: fraction in [0, 1] of style factors controlled jointly by
      two attributes (needs `num_attributes >= 2`).
    unique_compositions: give every persona a distinct composition; needs
      `num_personas <= values_per_attribute ** num_attributes`.
    persona_text: "none" (persona is None), "id" ("You are persona_0007.") or
      "hint" (adds the value of attribute `hint_attribute` under opaque names,
      e.g. "Your trait A is jade.", which says nothing about what it maps to).
    hint_attribute: which attribute the "hint" text persona names.
    min_words, max_words: bounds on the reply's whitespace-separated words.
  """

  num_personas: int = 220
  examples_per_persona: int = 40
  num_attributes: int = 5
  values_per_attribute: int = 4
  seed: int = 0
  style_strength: float = 0.8
  pair_fraction: float = 0.4
  unique_compositions: bool = True
  persona_text: str = "none"
  hint_attribute: int = 0
  min_words: int = 10
  max_words: int = 30

  def __post_init__(self):
    def bad(field, expected):
      value = getattr(self, field)
      raise ValueError(f"SyntheticCorpusConfig.{field}: expected {expected}, got {value!r}")

    for field in ("num_personas", "examples_per_persona"):
      if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
        bad(field, "an int >= 1")
    if not isinstance(self.num_attributes, int) or not 1 <= self.num_attributes <= len(_TRAIT_LETTERS):
      bad("num_attributes", f"an int in [1, {len(_TRAIT_LETTERS)}]")
    if not isinstance(self.values_per_attribute, int) or not 2 <= self.values_per_attribute <= len(_VALUE_WORDS):
      bad("values_per_attribute", f"an int in [2, {len(_VALUE_WORDS)}]")
    if not isinstance(self.seed, int):
      bad("seed", "an int")
    if not 0.0 <= self.style_strength <= 1.0:
      bad("style_strength", "a probability in [0, 1]")
    if not 0.0 <= self.pair_fraction <= 1.0:
      bad("pair_fraction", "a fraction in [0, 1]")
    if self.persona_text not in _PERSONA_TEXT:
      bad("persona_text", f"one of {_PERSONA_TEXT}")
    if not isinstance(self.hint_attribute, int) or not 0 <= self.hint_attribute < self.num_attributes:
      bad("hint_attribute", f"an attribute index in [0, {self.num_attributes})")
    # One long sentence plus opener and closer is at most 23 words; short
    # sentences are at least 4, so these bounds are always satisfiable.
    if not isinstance(self.min_words, int) or not 1 <= self.min_words <= 12:
      bad("min_words", "an int in [1, 12]")
    if not isinstance(self.max_words, int) or not max(self.min_words + 12, 24) <= self.max_words:
      bad("max_words", f"an int >= {max(self.min_words + 12, 24)}")
    if self.unique_compositions and self.num_personas > self.values_per_attribute ** self.num_attributes:
      bad("num_personas", f"<= values_per_attribute ** num_attributes = "
          f"{self.values_per_attribute ** self.num_attributes} when unique_compositions=True")


class Factor(NamedTuple):
  """One style factor of the hidden mapping."""

  name: str
  options: tuple
  # "choice": sampled per use with `style_strength` towards the preferred
  # option; "fixed": the preferred option is the persona's value (a rate, a casing).
  kind: str
  attributes: tuple[int, ...]
  # Option index for each joint value of `attributes`, in mixed radix.
  table: tuple[int, ...]


def _factor_specs() -> list[tuple[str, tuple, str]]:
  specs = [(f"word:{c}", words, "choice") for c, words in SYNONYMS.items()]
  specs += [
      ("outlook", ADJECTIVES, "choice"),
      ("theme", tuple(THEMES), "choice"),
      ("theme2", tuple(THEMES), "choice"),
      ("family", tuple(TEMPLATE_FAMILIES), "choice"),
      ("sentences", (1, 2, 3), "choice"),
      ("end", (".", "!", "..."), "choice"),
      ("question", ("?", "?!", "??"), "choice"),
      ("sep", (",", ";", " -"), "choice"),
      ("casing", ("lower", "capital"), "fixed"),
      ("opener", OPENERS, "choice"),
      ("opener_rate", (0.1, 0.5, 0.9), "fixed"),
      ("closer", CLOSERS, "choice"),
      ("closer_rate", (0.1, 0.5, 0.9), "fixed"),
  ]
  return specs


def deal_world(rng: random.Random, specs: list[tuple[str, tuple, str]], num_attributes: int,
               values_per_attribute: int, paired) -> tuple[Factor, ...]:
  """A hidden mapping: each style factor of `specs` (`(name, options, kind)`,
  shuffled here) gets a controlling attribute, a second one when
  `paired(name)` says so, and a balanced random table from their joint values
  to an option. Shared by every population in persomux."""
  a, v = num_attributes, values_per_attribute
  rng.shuffle(specs)
  # Primary controllers are dealt round-robin so every attribute controls
  # about len(specs) / a factors.
  order = list(range(a))
  rng.shuffle(order)
  factors = []
  for i, (name, options, kind) in enumerate(specs):
    attrs = [order[i % a]]
    if paired(name):
      attrs.append(rng.choice([x for x in range(a) if x != attrs[0]]))
    # Balanced table: each option is used about equally, and a factor with
    # enough options gives every joint value its own option.
    base = list(range(len(options)))
    rng.shuffle(base)
    table = [base[k % len(base)] for k in range(v ** len(attrs))]
    rng.shuffle(table)
    factors.append(Factor(name, tuple(options), kind, tuple(sorted(attrs)), tuple(table)))
  return tuple(sorted(factors, key=lambda f: f.name))


def _world(cfg: SyntheticCorpusConfig) -> tuple[Factor, ...]:
  """The hidden mapping from attribute values to style; depends only on the seed and sizes."""
  rng = random.Random(f"persomux.synthetic:{cfg.seed}:{cfg.num_attributes}:{cfg.values_per_attribute}:"
                      f"{cfg.pair_fraction}:world")
  a = cfg.num_attributes
  return deal_world(rng, _factor_specs(), a, cfg.values_per_attribute,
                    lambda name: a >= 2 and rng.random() < cfg.pair_fraction)


def preferred(world: tuple[Factor, ...], composition: tuple[int, ...], v: int) -> dict[str, Any]:
  style = {}
  for f in world:
    key = 0
    for attr in f.attributes:
      key = key * v + composition[attr]
    style[f.name] = f.options[f.table[key]]
  return style


def persona_name(index: int) -> str:
  return f"persona_{index:04d}"


def draw_compositions(rng: random.Random, num_personas: int, num_attributes: int, values_per_attribute: int,
                      unique: bool) -> dict[str, tuple[int, ...]]:
  """`{persona_name(i): attribute values}`; persona i depends only on `rng` and the personas before it."""
  seen = set()
  out = {}
  for i in range(num_personas):
    while True:
      comp = tuple(rng.randrange(values_per_attribute) for _ in range(num_attributes))
      if not unique or comp not in seen:
        break
    seen.add(comp)
    out[persona_name(i)] = comp
  return out


def persona_compositions(cfg: SyntheticCorpusConfig) -> dict[str, tuple[int, ...]]:
  """The hidden attribute values of each persona, `{name: (value per attribute)}`.

  For analysis and tests only: models must never see it. Persona i's
  composition depends only on the seed and the personas before it, so a larger
  `num_personas` extends the same population.
  """
  rng = random.Random(f"persomux.synthetic:{cfg.seed}:compositions")
  return draw_compositions(rng, cfg.num_personas, cfg.num_attributes, cfg.values_per_attribute,
                           cfg.unique_compositions)


def describe_style(cfg: SyntheticCorpusConfig, composition: tuple[int, ...]) -> dict[str, Any]:
  """The preferred option of every style factor for a composition, e.g. `{"end": "!", ...}`.

  Equal compositions give equal styles: the style is all that the reply
  distribution depends on (besides `style_strength`).
  """
  if len(composition) != cfg.num_attributes or not all(
      isinstance(x, int) and 0 <= x < cfg.values_per_attribute for x in composition):
    raise ValueError(f"describe_style composition: expected {cfg.num_attributes} ints in "
                     f"[0, {cfg.values_per_attribute}), got {composition!r}")
  return preferred(_world(cfg), tuple(composition), cfg.values_per_attribute)


class StyleSampler:
  """Draws a persona's choices: its preferred option with probability `strength`, else any option."""

  def __init__(self, style: dict[str, Any], strength: float, rng: random.Random):
    self.style, self.strength, self.rng = style, strength, rng

  def pick(self, name: str, options: tuple):
    if self.rng.random() < self.strength:
      return self.style[name]
    return self.rng.choice(options)


class _Speaker(StyleSampler):
  """Samples replies in one persona's style."""

  def theme_noun(self) -> str:
    r = self.rng.random()
    if r < self.strength:
      theme = self.style["theme"]
    elif r < self.strength + (1.0 - self.strength) / 2:
      theme = self.style["theme2"]
    else:
      theme = self.rng.choice(tuple(THEMES))
    return self.rng.choice(THEMES[theme])

  def adjective(self) -> str:
    concept = self.pick("outlook", ADJECTIVES)
    return self.pick(f"word:{concept}", SYNONYMS[concept])

  def sentence(self, topic: str) -> str:
    family = self.pick("family", tuple(TEMPLATE_FAMILIES))
    template = self.rng.choice(TEMPLATE_FAMILIES[family])
    slots = {"T": topic, "H": self.theme_noun(), "ADJ": self.adjective(), "ADJ2": self.adjective(),
             "SEP": self.pick("sep", (",", ";", " -"))}
    for concept, words in SYNONYMS.items():
      if "{" + concept + "}" in template:
        slots[concept] = self.pick(f"word:{concept}", words)
    text = template.format(**slots)
    if family == "question":
      return text + self.pick("question", ("?", "?!", "??"))
    return text + self.pick("end", (".", "!", "..."))

  def reply(self, topic: str, min_words: int, max_words: int) -> str:
    opener = self.pick("opener", OPENERS) if self.rng.random() < self.style["opener_rate"] else None
    closer = None
    if self.rng.random() < self.style["closer_rate"]:
      closer = self.pick("closer", CLOSERS) + self.pick("end", (".", "!", "..."))
    sentences = [self.sentence(topic) for _ in range(self.pick("sentences", (1, 2, 3)))]

    def count():
      return sum(len(s.split()) for s in [opener or "", *sentences, closer or ""])

    while count() < min_words:
      sentences.append(self.sentence(topic))
    while count() > max_words and len(sentences) > 1:
      sentences.pop()
    words = " ".join(([opener] if opener else []) + sentences + ([closer] if closer else [])).split(" ")
    if self.style["casing"] == "capital":
      # Capitalize "i" and every sentence start; the word after an opener
      # continues its sentence.
      starts = {0}
      starts.update(k + 1 for k, w in enumerate(words[:-1]) if w[-1] in ".!?")
      words = ["I" if w == "i" else (w[:1].upper() + w[1:] if k in starts else w) for k, w in enumerate(words)]
    return " ".join(words)


def make_corpus(cfg: SyntheticCorpusConfig = SyntheticCorpusConfig()) -> list[dict]:
  """All records, persona by persona.

  Returns:
    `num_personas * examples_per_persona` dicts with keys `class` (str),
    `text` (the reply, `min_words`..`max_words` words), `context` (str),
    `persona` (None, or a str when `persona_text` is not "none") and `group`
    (None). Deterministic for a config; a persona's records depend only on
    the seed, its index and `examples_per_persona`, not on `num_personas`.
  """
  world = _world(cfg)
  records = []
  for i, (name, comp) in enumerate(persona_compositions(cfg).items()):
    persona = None
    if cfg.persona_text == "id":
      persona = f"You are {name}."
    elif cfg.persona_text == "hint":
      persona = (f"You are {name}. Your trait {_TRAIT_LETTERS[cfg.hint_attribute]} is "
                 f"{_VALUE_WORDS[comp[cfg.hint_attribute]]}.")
    rng = random.Random(f"persomux.synthetic:{cfg.seed}:examples:{i}")
    speaker = _Speaker(preferred(world, comp, cfg.values_per_attribute), cfg.style_strength, rng)
    for _ in range(cfg.examples_per_persona):
      # The context is persona-independent: only the reply carries the style.
      topic = rng.choice(TOPICS)
      context = rng.choice(CONTEXT_TEMPLATES).format(t=topic)
      records.append({"class": name, "text": speaker.reply(topic, cfg.min_words, cfg.max_words),
                      "context": context, "persona": persona, "group": None})
  return records


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> None:
  """Writes one JSON object per line (UTF-8), creating parent directories."""
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")


def population_text(records: Iterable[dict], separator: str = "\n") -> list[str]:
  """Plain strings `context + separator + text` (just `text` without a context).

  For pretraining the small base LM and its tokenizer on the whole
  population; the text persona, if any, is left out.
  """
  out = []
  for r in records:
    context = r.get("context")
    out.append(f"{context}{separator}{r['text']}" if context else r["text"])
  return out
