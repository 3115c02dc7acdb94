"""A population of English-speaking personas with hidden styles (offline, seeded).

For the demo that personalizes a real instruct LM (SmolLM2-135M-Instruct):
every record is a natural user message (`context`) and a persona's natural
English reply (`text`), so the chat format is user: context, assistant: reply.
In the spirit of the APM benchmark's arbitrary preference mappings, personas
have latent attributes and a random mapping that no other code knows turns
attribute values into observable style, so a persona can only be learned from
its examples. `persomux.synthetic` is the toy-vocabulary sibling of this file
and has the same interface.

Generative process (everything is a function of `PersonaPopulationConfig.seed`):

1. Latent attributes. `num_attributes` attributes with `values_per_attribute`
   values each. Persona i (named `persona_0000`, ...; the name reveals
   nothing) draws one value per attribute, its *composition*; by default the
   compositions are distinct.
2. The hidden mapping (the *world*): 21 style factors, each a small set of
   options:
   - register: formal / casual / slangy / old-fashioned (sentence templates
     per speech act, contractions expanded or slang contracted);
   - length: terse (one sentence) / medium (three) / long (five);
   - stance: enthusiastic / grumpy / anxious / dry (reactions, asides, the
     verdict in opinions);
   - vocabulary: a preferred word in each of 4 synonym sets ("great / lovely /
     awesome / ...", "really / very / quite / super / ...", "I think / I
     reckon / I'd say / ...", "maybe / perhaps / ...");
   - catchphrases: a signature opener ("Right then,"), closer ("Just my two
     cents."), form of address ("..., mate.") and filler tag ("..., no
     joke."), each with its rate of use;
   - interests: a primary and a secondary hobby that replies steer toward
     (recommending a book about it, spending the day on it, ...);
   - punctuation: statement end mark (`.` `!` `...`), casing (standard, all
     lower case, or EMPHATIC capitals on intensifiers), an emoticon and its
     rate.
   Each factor is controlled by one attribute or (a `pair_fraction` of them,
   and always register, stance, opener, closer, filler and interest) jointly
   by two, through a random balanced table from the controlling values to an
   option. The persona's *style* is the tuple of preferred options, a
   deterministic function of its composition (`describe_style`); personas with
   equal compositions have equal style distributions.
3. Examples. A context is drawn uniformly from `CONTEXTS` (43 user messages of
   5 speech acts: recommend, advice, opinion, how was your day, plans),
   independently of the persona. The reply answers it: an optional opener, a
   reaction, the answer, an elaboration, a hobby aside and a stance comment
   (as many as the length allows), an optional closer and emoticon. Every
   choice follows the persona's preferred option with probability
   `style_strength`, otherwise it is uniform over the options; templates,
   fillers and content words are drawn at random, so replies are not copies.
   Replies have `min_words`..`max_words` whitespace-separated words.

Generating 300 personas x 40 examples takes a fraction of a second.

Records follow the core data format: `class` (persona name), `text` (the
reply), `context`, `persona` (None, or a vague one-attribute description with
`persona_text="vague"`) and `group` (None).
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any, NamedTuple

from persomux.synthetic import (Factor, StyleSampler, deal_world, draw_compositions, persona_name,
                                preferred)

REGISTERS = ("formal", "casual", "slangy", "old-fashioned")
STANCES = ("enthusiastic", "grumpy", "anxious", "dry")
LENGTHS = ("terse", "medium", "long")

# ---------------------------------------------------------------------------
# Contexts: persona-independent user messages.


class Context(NamedTuple):
  """A user message and what a reply needs to answer it."""

  text: str
  # "recommend" | "advice" | "opinion" | "day" | "plans".
  act: str
  # The medium (recommend), advice key (advice) or subject (opinion); "" else.
  subject: str


MEDIA = {
    "book": ("a cozy mystery novel", "an old detective story", "a thick fantasy saga",
             "a short collection of essays", "a good biography", "a classic adventure story"),
    "movie": ("an old black-and-white comedy", "a slow, beautiful drama", "a silly action film",
              "a classic western", "a clever heist movie"),
    "podcast": ("a true crime podcast", "a history podcast", "a podcast of long interviews",
                "a science podcast for beginners"),
    "TV show": ("a gentle baking show", "an old sitcom", "a nature documentary series",
                "a gripping crime drama"),
    "board game": ("a quick card game", "a classic like Scrabble", "a cooperative board game",
                   "a silly party game"),
}
_RECOMMEND_CONTEXTS = ("Can you recommend a good {m}?", "I need a new {m}. Any ideas?")

# Each advice is a base-form verb phrase: "I would suggest that you {advice}."
ADVICE = {
    "What should I cook tonight?": (
        "make a simple pasta with garlic and lemon", "cook a big pot of vegetable curry",
        "throw together some tacos", "make a warm bowl of soup",
        "fry up an omelette with whatever is in the fridge"),
    "Any tips for a rainy weekend?": (
        "curl up with a good book", "bake a batch of cookies", "start a big jigsaw puzzle",
        "visit a museum", "have a movie marathon"),
    "How can I relax after work?": (
        "take a long walk", "run yourself a hot bath", "put your phone away for an hour",
        "listen to some calm music", "cook something slow and simple"),
    "How do I stay motivated to exercise?": (
        "find a friend to train with", "start with ten minutes a day", "pick a sport you actually enjoy",
        "write down every workout"),
    "Any advice for a job interview?": (
        "read up on the company", "prepare a few stories about your work", "arrive ten minutes early",
        "bring a question or two of your own"),
    "How can I sleep better?": (
        "keep screens out of the bedroom", "go to bed at the same time every night",
        "skip coffee after lunch", "read a paper book before bed"),
    "What's a good gift for a friend?": (
        "get them a nice notebook", "cook them a proper dinner", "give them a plant",
        "get them tickets to a show"),
    "How do I make friends in a new city?": (
        "join a local club", "say yes to every invitation", "take an evening class",
        "chat with your neighbours"),
    "I'm bored. What should I do?": (
        "go for a walk", "call an old friend", "learn a card trick", "tidy one drawer"),
}

# Pros and cons are clauses: "The best part is that {pro}."
OPINIONS = {
    "learning to code": (("you can build your own little tools", "it teaches you to think clearly"),
                         ("you spend hours hunting a missing bracket", "the tools change every five minutes")),
    "remote work": (("you skip the commute", "you can work in your slippers"),
                    ("you never really leave the office", "you can go days without talking to anyone")),
    "social media": (("you can keep up with old friends", "you find people who share your hobbies"),
                     ("it eats your whole evening", "everyone only shows their best side")),
    "living in a big city": (("there is always something going on", "you can get anywhere by train"),
                             ("everything costs a fortune", "it is never truly quiet")),
    "getting a dog": (("you get a loyal friend for life", "you are out walking every day"),
                      ("someone has to walk it in the rain", "holidays get complicated")),
    "travelling alone": (("you can go wherever you like", "you meet people you never would otherwise"),
                         ("nobody watches your bags", "dinner for one gets lonely")),
    "owning an electric car": (("it is quiet and cheap to run", "you never queue for petrol"),
                      ("charging takes forever", "a new one costs a fortune")),
    "waking up early": (("you get the quiet hours to yourself", "the whole day feels longer"),
                        ("your body never quite agrees", "you are useless by nine in the evening")),
}
_OPINION_CONTEXTS = ("What do you think about {s}?", "Is {s} worth it?")

_DAY_CONTEXTS = ("How was your day?", "How was your weekend?", "What did you do today?", "How did your week go?")
_PLANS_CONTEXTS = ("What are you up to tonight?", "Any plans for the holidays?", "What are you doing this weekend?",
                   "Got any plans for tomorrow?")


def _contexts() -> tuple[Context, ...]:
  out = [Context(t.format(m=m), "recommend", m) for m in MEDIA for t in _RECOMMEND_CONTEXTS]
  out += [Context(q, "advice", q) for q in ADVICE]
  out += [Context(t.format(s=s), "opinion", s) for s in OPINIONS for t in _OPINION_CONTEXTS]
  out += [Context(q, "day", "") for q in _DAY_CONTEXTS]
  out += [Context(q, "plans", "") for q in _PLANS_CONTEXTS]
  return tuple(out)


CONTEXTS = _contexts()
_CONTEXT_BY_TEXT = {c.text: c for c in CONTEXTS}

# ---------------------------------------------------------------------------
# Persona content: interests, vocabulary, catchphrases.

# topic (a noun phrase), activities (gerund phrases: "I'd rather be {activity}"),
# things (singular noun phrases: "Anyway, {thing} is calling me.").
INTERESTS = {
    "gardening": ("gardening", ("pottering about in the garden", "repotting my tomato plants",
                                "pulling weeds in the vegetable patch"),
                  ("my vegetable patch", "my little herb garden")),
    "cycling": ("cycling", ("riding my bike along the canal", "fixing a flat tyre on my bike",
                            "cycling out to the next village"), ("my old racing bike", "my squeaky bike chain")),
    "jazz": ("jazz", ("listening to old jazz records", "practising the saxophone",
                      "hunting for vinyl in second-hand shops"), ("my record collection", "my old saxophone")),
    "astronomy": ("stargazing", ("looking at the stars through my telescope", "reading about distant galaxies",
                                 "waiting for a clear night sky"), ("my telescope", "my new star chart")),
    "baking": ("baking", ("baking sourdough bread", "trying out a new cake recipe", "feeding my sourdough starter"),
               ("my sourdough starter", "a fresh loaf of bread")),
    "chess": ("chess", ("playing chess online", "studying old chess games", "losing at chess to my neighbour"),
              ("my chess board", "a tricky chess puzzle")),
    "hiking": ("hiking", ("hiking up in the hills", "planning my next long walk", "breaking in my new walking boots"),
               ("my old walking stick", "my trail map")),
    "birdwatching": ("birdwatching", ("watching the birds at my feeder", "counting sparrows in the park",
                                      "looking for herons by the river"), ("my bird feeder", "my bird notebook")),
    "video games": ("video games", ("playing video games", "grinding levels in my favourite game",
                                    "building a castle in Minecraft"), ("my game console", "my latest save file")),
    "knitting": ("knitting", ("knitting a new scarf", "sorting my yarn collection", "learning a fancy new stitch"),
                 ("my yarn basket", "the scarf I'm knitting")),
    "football": ("football", ("watching football with friends", "kicking a ball around in the park",
                              "arguing about last night's match"),
                 ("my lucky football shirt", "my fantasy football team")),
    "cats": ("cats", ("playing with my cat", "brushing my cat", "watching my cat chase a sunbeam"),
             ("my cat Biscuit", "my cat's scratching post")),
}

SYNONYMS = {
    "GOOD": ("great", "lovely", "awesome", "excellent", "wonderful", "brilliant", "fantastic"),
    "VERY": ("really", "very", "quite", "super", "truly", "pretty", "so"),
    "THINK": ("I think", "I reckon", "I'd say", "I suppose", "I believe", "I feel like"),
    "MAYBE": ("maybe", "perhaps", "possibly", "ideally"),
}

OPENERS = ("Oh boy,", "Well, well,", "Right then,", "Okay so,", "Ah,", "Listen,", "Hmm,", "Goodness me,", "Yo,",
           "Alrighty,", "Oh hey,", "Let me think.", "Good question!", "Ahem.", "Heh,", "Oh my,", "Look,",
           "So,")
CLOSERS = ("Cheers!", "Just my two cents.", "Take it easy.", "Trust me on this.", "Stay curious.", "Over and out.",
           "Peace out.", "Keep smiling.", "Mark my words.", "Such is life.", "Toodle-oo!", "Fingers crossed.",
           "Catch you later.", "Yours truly.", "Onwards!", "Bless.")
ADDRESSES = ("friend", "mate", "buddy", "my dear", "pal", "dude")
# Tags a persona hangs on the end of its sentences: "Try tacos, no joke."
FILLERS = ("you know", "I guess", "to be fair", "if I'm honest", "basically", "no joke", "I must say",
           "believe it or not", "as it happens", "seriously", "for real", "in my experience")
EMOTICONS = (":)", ":D", ";)", "^_^", ":P", "xD")

# ---------------------------------------------------------------------------
# Templates. Slots: {item} (recommend), {advice}/{advice2} (advice), {subject},
# {eval}, {pro}, {con} (opinion), {activity}, {thing}, {topic} (the reply's
# hobby), and the synonym sets {GOOD} {VERY} {THINK} {MAYBE}. Written with
# contractions; formal and old-fashioned replies expand them.

ANSWERS = {
    "recommend": {
        "formal": ("I would recommend {item}.", "May I suggest {item}? It is {VERY} {GOOD}.",
                   "{item} would be a {GOOD} choice.", "If I may, {item} is well worth your time.",
                   "I can sincerely recommend {item}."),
        "casual": ("Try {item}, it's {VERY} {GOOD}.", "You should check out {item}.", "I'd go with {item}.",
                   "{item}, for sure.", "How about {item}?"),
        "slangy": ("{item}, hands down.", "Gotta be {item} tbh.", "Just grab {item}, it slaps.",
                   "Ngl {item} is lowkey {GOOD}.", "{item}. No cap, it's {VERY} {GOOD}."),
        "old-fashioned": ("I should heartily recommend {item}.", "You could do far worse than {item}, I dare say.",
                          "Pray, try {item}; it is {VERY} {GOOD}.", "In my day we all swore by {item}.",
                          "Allow me to commend {item} to you."),
    },
    "advice": {
        "formal": ("I would suggest that you {advice}.", "It might be wise to {advice}.",
                   "You may wish to {advice}.", "My recommendation would be to {advice}."),
        "casual": ("Just {advice}, honestly.", "I'd {advice}.", "{MAYBE} {advice}?", "You could always {advice}."),
        "slangy": ("Just {advice} fr.", "Real talk, {advice}.", "Lowkey you should {advice}.",
                   "Easy, {advice} and vibe."),
        "old-fashioned": ("Were I you, I should {advice}.", "Pray, {advice}.",
                          "My late grandmother always said to {advice}.", "Take it from an old hand: {advice}."),
    },
    "opinion": {
        "formal": ("{THINK} {subject} is {eval}.", "In my view, {subject} is {eval}.",
                   "If you want my honest opinion, {subject} is {eval}."),
        "casual": ("{THINK} {subject} is {eval}.", "{subject}? {eval}, if you ask me.",
                   "Honestly, {subject} is {eval}."),
        "slangy": ("{subject} is {eval} ngl.", "Lowkey {subject} is {eval}.", "Tbh {subject}? {eval}."),
        "old-fashioned": ("I dare say {subject} is {eval}.", "{subject}, in my humble opinion, is {eval}.",
                          "Speaking as one of the old school, {subject} is {eval}."),
    },
    "day": {
        "formal": ("I spent most of it {activity}.", "It was a quiet one; I was mostly {activity}.",
                   "I have mostly been {activity}."),
        "casual": ("Spent most of it {activity}.", "I've mostly been {activity}.", "Mostly {activity}, to be honest."),
        "slangy": ("Been {activity} all day lol.", "Ngl I was {activity} the whole time.",
                   "Mostly {activity}, it was a vibe."),
        "old-fashioned": ("I passed the hours {activity}, as is my custom.", "I have been {activity}, much as ever.",
                          "Why, I was {activity} from dawn till dusk."),
    },
    "plans": {
        "formal": ("I plan on {activity}.", "I expect I will be {activity}.", "I will most likely be {activity}."),
        "casual": ("Probably {activity}, to be honest.", "I'll be {activity}, most likely.",
                   "Gonna be {activity}, I think."),
        "slangy": ("Prob {activity} ngl.", "Gonna be {activity} lol.", "{activity}, obviously. It's a whole vibe."),
        "old-fashioned": ("I shall be {activity}, as is my habit.", "If the weather holds, I shall be {activity}.",
                          "Why, {activity}, naturally."),
    },
}

ELABORATIONS = {
    "recommend": {
        "formal": ("It is thoughtful and {VERY} well made.", "I believe you would find it rewarding.",
                   "It has stayed with me for years."),
        "casual": ("It's {VERY} easy to get into.", "I couldn't stop once I started.", "You won't regret it."),
        "slangy": ("It's {VERY} {GOOD}, trust me.", "Lowkey changed my life.", "Ten out of ten, no notes."),
        "old-fashioned": ("They simply do not make them like that anymore.", "It has aged like a fine wine.",
                          "It was a great favourite of my late uncle."),
    },
    "advice": {
        "formal": ("Alternatively, you could {advice2}.", "It may also help to {advice2}.",
                   "You might also {advice2}."),
        "casual": ("Or {advice2}, that works too.", "You could also {advice2}.", "{MAYBE} {advice2} as well."),
        "slangy": ("Or {advice2}, also valid.", "Also {advice2}, big brain move.", "Or just {advice2} tbh."),
        "old-fashioned": ("Failing that, {advice2}.", "Or {advice2}, as we did in my day.",
                          "One might also {advice2}."),
    },
    "day": {
        "formal": ("I find it {VERY} restful.", "It is a {VERY} {GOOD} way to spend the time.",
                   "{thing} keeps me busy these days."),
        "casual": ("It's {VERY} relaxing, honestly.", "{thing} needed some attention anyway.",
                   "Can't complain, really."),
        "slangy": ("It's {VERY} chill ngl.", "{thing} is my whole world rn.", "Low effort, high vibes."),
        "old-fashioned": ("One must keep oneself occupied, after all.", "{thing} is a great comfort to me.",
                          "It is a {VERY} {GOOD} way to pass the time."),
    },
}
ELABORATIONS["plans"] = ELABORATIONS["day"]

# The verdict of an opinion and its reason follow the stance, not the register.
EVALS = {
    "enthusiastic": ("{VERY} {GOOD}", "the best thing ever", "{VERY} exciting"),
    "grumpy": ("overrated", "more trouble than it's worth", "a lot of fuss about nothing"),
    "anxious": ("a bit scary", "{VERY} daunting", "nerve-wracking"),
    "dry": ("fine, in small doses", "about as fun as it sounds", "perfectly survivable"),
}
REASONS = {
    "enthusiastic": ("The best part is that {pro}!", "Just think, {pro}!", "I love that {pro}."),
    "grumpy": ("The trouble is that {con}.", "Nobody mentions that {con}.", "And don't forget that {con}."),
    "anxious": ("I always worry that {con}.", "What if {con}?", "I keep thinking that {con}."),
    "dry": ("Sure, {pro}, but {con}.", "On the bright side, {pro}. On the other side, {con}.",
            "It's {GOOD} until {con}."),
}

REACTIONS = {
    "recommend": {
        "enthusiastic": ("Ooh, I love this question!", "Oh, I have just the thing!",
                         "Yes, I know exactly what you need!"),
        "grumpy": ("Most of what's out there is rubbish, but fine.", "Fine, if you insist.",
                   "Everything new is overrated, but here goes."),
        "anxious": ("Oh, I hope you like it, I'm never sure.", "I'm always nervous recommending things, but okay.",
                    "Please don't blame me if you hate it."),
        "dry": ("Bold of you to trust my taste.", "Ah, a job for my vast wisdom.",
                "I suppose I can spare a recommendation."),
    },
    "advice": {
        "enthusiastic": ("Oh, I've got loads of ideas!", "Great question, this'll be fun!", "Ooh, let me help!"),
        "grumpy": ("Nobody ever takes my advice, but fine.", "Ugh, everyone asks me that.",
                   "There's no magic trick, but here goes."),
        "anxious": ("Oh, I hope this helps, I'm no expert.", "I'm not sure I'm the right person to ask, but I'll try.",
                    "Don't hold me to this, okay?"),
        "dry": ("Ah, the eternal question.", "Let me consult my notes.", "Well, there's always the obvious answer."),
    },
    "opinion": {
        "enthusiastic": ("Oh, I love talking about this!", "What a great thing to ask about!",
                         "Oh, I have feelings about this, good ones!"),
        "grumpy": ("Don't get me started.", "Oh, here we go.", "You won't like my answer."),
        "anxious": ("Oh, that's a tricky one for me.", "I go back and forth on this a lot.",
                    "It makes me a little nervous, to be honest."),
        "dry": ("Ah, the big questions.", "I have opinions, as one does.", "Strap in, this one's deep."),
    },
    "day": {
        "enthusiastic": ("It was {VERY} {GOOD}, thanks for asking!", "One of the best in ages!", "Oh, it was lovely!"),
        "grumpy": ("Long. Far too long.", "Could have been worse, I suppose.", "Don't ask."),
        "anxious": ("A bit stressful, to be honest.", "Busy, and I keep thinking I forgot something.",
                    "Okay, I think, but I'm a little frazzled."),
        "dry": ("Thrilling, as always.", "It happened, which is something.",
                "Nobody called, so I'd call it a success."),
    },
    "plans": {
        "enthusiastic": ("Oh, I can't wait!", "I've got the best plan!", "So glad you asked!"),
        "grumpy": ("Nothing exciting, as usual.", "Plans are overrated.", "Whatever happens, it'll rain."),
        "anxious": ("I haven't decided yet, which worries me.", "I'm trying not to overthink it.",
                    "Hopefully nothing goes wrong."),
        "dry": ("My calendar is, as ever, wide open.", "Big plans. Huge. Mostly sitting.",
                "I've cleared my schedule, which was already clear."),
    },
}

# Asides that fit any context (a reply about the past day included).
COMMENTS = {
    "enthusiastic": ("Life is {GOOD}, honestly!", "I'm in such a {GOOD} mood now!",
                     "Thanks for asking, this made my day!"),
    "grumpy": ("Not that anyone listens to me.", "But what do I know.", "Anyway, enough about that."),
    "anxious": ("I hope that's okay.", "Sorry, I'm rambling.", "I hope I got that right."),
    "dry": ("Riveting stuff, I know.", "Try to contain your excitement.", "That's all I've got, for what it's worth."),
}

# Asides that steer any reply toward the persona's hobby.
STEERS = {
    "formal": ("For my part, I am happiest {activity}.", "Now, if you will excuse me, {thing} awaits.",
               "I have been {activity} a great deal lately.", "Of course, I am rather partial to {topic} myself."),
    "casual": ("Then again, I'd rather be {activity}.", "Anyway, I spent the morning {activity}.",
               "Anyway, {thing} is calling me.", "But you know me, I'm all about {topic}."),
    "slangy": ("Ngl I'd rather be {activity} rn.", "Anyway {topic} is my whole personality lol.",
               "Me? I'd just be {activity} tbh.", "{thing} would never let me down fr."),
    "old-fashioned": ("Myself, I know no finer pastime than {activity}.", "Now I must be off, for {thing} awaits.",
                      "In my youth I was forever {activity}.", "I have always had a soft spot for {topic}."),
}

# The "vague" text persona describes the preferred option of one factor.
VAGUE_TEXTS = {
    "length": {"terse": "You are a person of few words.", "medium": "You are a fairly easygoing talker.",
               "long": "You are a chatty person."},
    "stance": {"enthusiastic": "You are a cheerful person.", "grumpy": "You are a bit of a grump.",
               "anxious": "You are a worrier.", "dry": "You have a dry sense of humor."},
    "register": {"formal": "You are a polite, proper person.", "casual": "You are a laid-back person.",
                 "slangy": "You spend a lot of time online.", "old-fashioned": "You are rather old-fashioned."},
}
_PERSONA_TEXT = ("none", "vague")

# Contractions expanded in formal and old-fashioned replies; `let's` stays.
_EXPANSIONS = (("can't", "cannot"), ("won't", "will not"), ("n't", " not"), ("I'm", "I am"), ("I'd", "I would"),
               ("you'd", "you would"), ("'ll", " will"), ("'ve", " have"), ("'re", " are"), ("it's", "it is"),
               ("that's", "that is"), ("there's", "there is"), ("what's", "what is"), ("one's", "one is"))
_SLANG = (("going to", "gonna"), ("want to", "wanna"), ("got to", "gotta"), ("kind of", "kinda"))


@dataclasses.dataclass(frozen=True)
class PersonaPopulationConfig:
  """What to generate.

  Attributes:
    num_personas: number of personas (classes), named `persona_0000`, ...
    examples_per_persona: context -> reply records per persona.
    num_attributes: latent attributes per persona, 1 to 8.
    values_per_attribute: values of each attribute, 2 to 6.
    seed: seeds the hidden mapping, the compositions and the examples.
    style_strength: probability in [0, 1] that a choice follows the persona's
      preferred option (else it is uniform over the options).
    pair_fraction: fraction in [0, 1] of the other style factors that are
      controlled jointly by two attributes; register, stance, opener, closer,
      filler and interest always are (when `num_attributes >= 2`), except the
      `vague_factor`.
    unique_compositions: give every persona a distinct composition; needs
      `num_personas <= values_per_attribute ** num_attributes`.
    persona_text: "none" (persona is None) or "vague" (a sentence such as
      "You are a chatty person." describing the persona's `vague_factor`,
      which is controlled by one attribute only: a partial hint).
    vague_factor: the factor the vague text describes: "length", "stance" or
      "register".
    min_words, max_words: bounds on the reply's whitespace-separated words.
  """

  num_personas: int = 300
  examples_per_persona: int = 40
  num_attributes: int = 6
  values_per_attribute: int = 4
  seed: int = 0
  style_strength: float = 0.85
  pair_fraction: float = 0.4
  unique_compositions: bool = True
  persona_text: str = "none"
  vague_factor: str = "length"
  min_words: int = 8
  max_words: int = 60

  def __post_init__(self):
    def bad(field, expected):
      raise ValueError(f"PersonaPopulationConfig.{field}: expected {expected}, got {getattr(self, field)!r}")

    def is_int(value):
      return isinstance(value, int) and not isinstance(value, bool)

    for field in ("num_personas", "examples_per_persona"):
      if not is_int(getattr(self, field)) or getattr(self, field) < 1:
        bad(field, "an int >= 1")
    if not is_int(self.num_attributes) or not 1 <= self.num_attributes <= 8:
      bad("num_attributes", "an int in [1, 8]")
    if not is_int(self.values_per_attribute) or not 2 <= self.values_per_attribute <= 6:
      bad("values_per_attribute", "an int in [2, 6]")
    if not is_int(self.seed):
      bad("seed", "an int")
    if not isinstance(self.style_strength, (int, float)) or not 0.0 <= self.style_strength <= 1.0:
      bad("style_strength", "a probability in [0, 1]")
    if not isinstance(self.pair_fraction, (int, float)) or not 0.0 <= self.pair_fraction <= 1.0:
      bad("pair_fraction", "a fraction in [0, 1]")
    if self.persona_text not in _PERSONA_TEXT:
      bad("persona_text", f"one of {_PERSONA_TEXT}")
    if self.vague_factor not in VAGUE_TEXTS:
      bad("vague_factor", f"one of {tuple(VAGUE_TEXTS)}")
    # The longest answer sentence with opener, closer and emoticon is under 30
    # words and a padded reply under min_words + 20, so these bounds always hold.
    if not is_int(self.min_words) or not 1 <= self.min_words <= 12:
      bad("min_words", "an int in [1, 12]")
    if not is_int(self.max_words) or self.max_words < 32:
      bad("max_words", "an int >= 32")
    if self.unique_compositions and self.num_personas > self.values_per_attribute ** self.num_attributes:
      bad("num_personas", f"<= values_per_attribute ** num_attributes = "
          f"{self.values_per_attribute ** self.num_attributes} when unique_compositions=True")


_RATES = (0.3, 0.6, 0.9)
# Jointly controlled by two attributes: a register or stance is a composition,
# and the many-option signatures are not shared by every persona with one value.
_ALWAYS_PAIRED = ("register", "stance", "opener", "closer", "interest", "filler")


def _factor_specs() -> list[tuple[str, tuple, str]]:
  specs = [
      ("register", REGISTERS, "choice"),
      ("stance", STANCES, "choice"),
      ("length", LENGTHS, "choice"),
      ("interest", tuple(INTERESTS), "choice"),
      ("interest2", tuple(INTERESTS), "choice"),
      ("opener", OPENERS, "choice"),
      ("opener_rate", _RATES, "fixed"),
      ("closer", CLOSERS, "choice"),
      ("closer_rate", _RATES, "fixed"),
      ("address", ADDRESSES, "choice"),
      ("address_rate", (0.0, 0.35, 0.7), "fixed"),
      ("filler", FILLERS, "choice"),
      ("filler_rate", (0.2, 0.45, 0.7), "fixed"),
      ("end", (".", "!", "..."), "choice"),
      ("casing", ("standard", "lowercase", "emphatic"), "fixed"),
      ("emoticon", EMOTICONS, "choice"),
      ("emoticon_rate", (0.0, 0.5, 0.9), "fixed"),
  ]
  specs += [(f"word:{c}", words, "choice") for c, words in SYNONYMS.items()]
  return specs


def _world(cfg: PersonaPopulationConfig) -> tuple[Factor, ...]:
  """The hidden mapping from attribute values to style; depends only on the seed, sizes and `vague_factor`."""
  rng = random.Random(f"persomux.personas_en:{cfg.seed}:{cfg.num_attributes}:{cfg.values_per_attribute}:"
                      f"{cfg.pair_fraction}:{cfg.vague_factor}:world")
  a = cfg.num_attributes

  def paired(name):
    wanted = name in _ALWAYS_PAIRED or rng.random() < cfg.pair_fraction
    return a >= 2 and wanted and name != cfg.vague_factor

  return deal_world(rng, _factor_specs(), a, cfg.values_per_attribute, paired)


def persona_compositions(cfg: PersonaPopulationConfig) -> dict[str, tuple[int, ...]]:
  """The hidden attribute values of each persona, `{name: (value per attribute)}`.

  For analysis and tests only: models must never see it. Persona i's
  composition depends only on the seed and the personas before it, so a larger
  `num_personas` extends the same population.
  """
  rng = random.Random(f"persomux.personas_en:{cfg.seed}:{cfg.num_attributes}:{cfg.values_per_attribute}:"
                      "compositions")
  return draw_compositions(rng, cfg.num_personas, cfg.num_attributes, cfg.values_per_attribute,
                           cfg.unique_compositions)


def describe_style(cfg: PersonaPopulationConfig, persona: int | str | tuple[int, ...]) -> dict[str, Any]:
  """The preferred option of every style factor, e.g. `{"register": "slangy", "end": "!", ...}`.

  Args:
    persona: an index, a name (`"persona_0007"`) or a composition (a tuple of
      `num_attributes` ints in `[0, values_per_attribute)`).

  Equal compositions give equal styles: the style is all that the reply
  distribution depends on (besides `style_strength`).
  """
  if isinstance(persona, str) or (isinstance(persona, int) and not isinstance(persona, bool)):
    name = persona if isinstance(persona, str) else persona_name(persona)
    comps = persona_compositions(cfg)
    if name not in comps:
      raise ValueError(f"describe_style persona: expected an index in [0, {cfg.num_personas}) or a name "
                       f"persona_0000..{persona_name(cfg.num_personas - 1)}, got {persona!r}")
    composition = comps[name]
  else:
    composition = tuple(persona)
    if len(composition) != cfg.num_attributes or not all(
        isinstance(x, int) and 0 <= x < cfg.values_per_attribute for x in composition):
      raise ValueError(f"describe_style composition: expected {cfg.num_attributes} ints in "
                       f"[0, {cfg.values_per_attribute}), got {persona!r}")
  return preferred(_world(cfg), composition, cfg.values_per_attribute)


def _expand(text: str) -> str:
  for short, long in _EXPANSIONS:
    text = text.replace(short, long).replace(short[:1].upper() + short[1:], long[:1].upper() + long[1:])
  return text


def _slang(text: str) -> str:
  for long, short in _SLANG:
    text = text.replace(long, short)
  return text


_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[AEIOUaeiou])(?!(?:[Uu]s|[Uu]ni|[Oo]ne))")
_SLOT = re.compile(r"\{(\w+)\}")
_INNER_START = re.compile(r"([.?!] )([a-z])")
_ENDS_IN_TAG = re.compile(r",( \S+){1,3}$")


def _before_end(sentence: str, words: str) -> str:
  """Inserts `words` before the sentence's final punctuation ("Hi." -> "Hi, mate.")."""
  cut = len(sentence) - len(re.search(r"[.!?]*$", sentence).group())
  return sentence[:cut] + words + sentence[cut:]


class _Speaker(StyleSampler):
  """Samples replies in one persona's style."""

  def hobby(self) -> str:
    r = self.rng.random()
    if r < self.strength:
      return self.style["interest"]
    if r < self.strength + (1.0 - self.strength) / 2:
      return self.style["interest2"]
    return self.rng.choice(tuple(INTERESTS))

  def fill(self, template: str, slots: dict[str, str]) -> str:
    def one(m):
      name = m.group(1)
      if name in SYNONYMS:
        word = self.pick(f"word:{name}", SYNONYMS[name])
        if name in ("GOOD", "VERY") and self.style["casing"] == "emphatic" and self.rng.random() < 0.8:
          word = word.upper()
        return word
      value = slots[name]
      return self.rng.choice(value) if isinstance(value, tuple) else value

    # Slot values may hold slots themselves ({eval} -> "{VERY} {GOOD}").
    while "{" in template:
      template = _SLOT.sub(one, template)
    # Capitalize the sentence and any inner sentence ("Remote work? Overrated.").
    return _INNER_START.sub(lambda m: m.group(1) + m.group(2).upper(), template[:1].upper() + template[1:])

  def reply(self, context: Context, min_words: int, max_words: int) -> str:
    rng, style, act = self.rng, self.style, context.act
    register = self.pick("register", REGISTERS)
    stance = self.pick("stance", STANCES)
    length = self.pick("length", LENGTHS)
    topic, activities, things = INTERESTS[self.hobby()]  # One hobby per reply.
    slots = {"activity": activities, "thing": things, "topic": topic, "subject": context.subject}
    if act == "recommend":
      medium = "film" if context.subject == "movie" else context.subject
      slots["item"] = f"a {medium} about {topic}" if rng.random() < 0.5 else MEDIA[context.subject]
    elif act == "advice":
      slots["advice"], slots["advice2"] = rng.sample(ADVICE[context.subject], 2)
    elif act == "opinion":
      slots["eval"] = EVALS[stance]
      slots["pro"], slots["con"] = OPINIONS[context.subject]

    def say(bank, tag=False):
      s = self.fill(rng.choice(bank), slots)
      # A sentence that already ends in a tag ("..., it slaps.") takes no filler.
      if tag and rng.random() < style["filler_rate"] and not _ENDS_IN_TAG.search(s):
        s = _before_end(s, ", " + self.pick("filler", FILLERS))
      if register in ("formal", "old-fashioned"):
        s = _expand(s)
      elif register == "slangy":
        s = _slang(s)
      # The persona's end mark replaces a plain full stop.
      return s[:-1] + self.pick("end", (".", "!", "...")) if s.endswith(".") else s

    # Sentences in reply order; all but the answer are optional. Replies about
    # the day or plans are about the hobby already and need no aside.
    parts = {"reaction": say(REACTIONS[act][stance]), "answer": say(ANSWERS[act][register], True),
             "elaboration": say(REASONS[stance] if act == "opinion" else ELABORATIONS[act][register], True)}
    if act not in ("day", "plans"):
      parts["steer"] = say(STEERS[register], True)
    parts["comment"] = say(COMMENTS[stance])
    extras = [p for p in ("elaboration", "steer", "comment") if p in parts]
    if length == "terse":
      keep = {"answer"}
    elif length == "medium":
      keep = {"answer", "reaction", rng.choice(extras[:2])}
    else:
      keep = set(parts)
    opener = self.pick("opener", OPENERS) if rng.random() < style["opener_rate"] else None
    closer = self.pick("closer", CLOSERS) if rng.random() < style["closer_rate"] else None
    emoticon = self.pick("emoticon", EMOTICONS) if rng.random() < style["emoticon_rate"] else None
    address = self.pick("address", ADDRESSES) if rng.random() < style["address_rate"] else None

    def render(keep):
      sentences = [s for p, s in parts.items() if p in keep]
      if address:
        sentences[0] = _before_end(sentences[0], ", " + address)
      if opener:
        first = sentences[0]
        if opener.endswith(",") and not re.match(r"I\b|[A-Z]{2}", first):
          first = first[:1].lower() + first[1:]
        sentences = [opener, first, *sentences[1:]]
      if closer:
        sentences.append(closer)
      text = _A_BEFORE_VOWEL.sub(r"\1n ", " ".join(sentences))
      if style["casing"] == "lowercase":
        text = text.lower()
      return f"{text} {emoticon}" if emoticon else text

    text = render(keep)
    for p in ("reaction", "comment", "elaboration", "steer"):  # Pad a short reply.
      if len(text.split()) >= min_words:
        break
      if p in parts and p not in keep:
        keep = keep | {p}
        text = render(keep)
    for p in ("comment", "steer", "elaboration", "reaction"):  # Shorten a long one.
      if len(text.split()) <= max_words:
        break
      if p in keep:
        keep = keep - {p}
        text = render(keep)
    return text


def vague_text(cfg: PersonaPopulationConfig, style: dict[str, Any]) -> str:
  """The vague text persona for a style: describes only `cfg.vague_factor`."""
  return VAGUE_TEXTS[cfg.vague_factor][style[cfg.vague_factor]]


def make_corpus(cfg: PersonaPopulationConfig = PersonaPopulationConfig()) -> list[dict]:
  """All records, persona by persona.

  Returns:
    `num_personas * examples_per_persona` dicts with keys `class` (str),
    `text` (the reply, `min_words`..`max_words` words), `context` (str, one of
    `CONTEXTS`), `persona` (None, or the vague text) and `group` (None).
    Deterministic for a config; a persona's records depend only on the seed,
    its index and `examples_per_persona`, not on `num_personas`.
  """
  world = _world(cfg)
  records = []
  for i, (name, comp) in enumerate(persona_compositions(cfg).items()):
    style = preferred(world, comp, cfg.values_per_attribute)
    persona = vague_text(cfg, style) if cfg.persona_text == "vague" else None
    rng = random.Random(f"persomux.personas_en:{cfg.seed}:examples:{i}")
    speaker = _Speaker(style, cfg.style_strength, rng)
    for _ in range(cfg.examples_per_persona):
      # The context is persona-independent: only the reply carries the style.
      context = rng.choice(CONTEXTS)
      records.append({"class": name, "text": speaker.reply(context, cfg.min_words, cfg.max_words),
                      "context": context.text, "persona": persona, "group": None})
  return records


def sample_replies(cfg: PersonaPopulationConfig, persona: int | str, context: str, n: int = 3,
                   seed: int = 0) -> list[str]:
  """`n` fresh replies of a persona to one of `CONTEXTS`, e.g. references for a demo.

  Independent of `make_corpus`'s draws (its own rng, from `seed`); same
  style, length bounds and `style_strength`.
  """
  if context not in _CONTEXT_BY_TEXT:
    raise ValueError(f"sample_replies context: expected one of personas_en.CONTEXTS, got {context!r}")
  style = describe_style(cfg, persona)
  name = persona if isinstance(persona, str) else persona_name(persona)
  rng = random.Random(f"persomux.personas_en:{cfg.seed}:samples:{name}:{context}:{seed}")
  speaker = _Speaker(style, cfg.style_strength, rng)
  return [speaker.reply(_CONTEXT_BY_TEXT[context], cfg.min_words, cfg.max_words) for _ in range(n)]
