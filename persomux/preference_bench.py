"""A preference benchmark with a hidden mapping (after the APM benchmark), for Drift.

Offline and seeded. Simulated users have attribute vectors; a hidden random
signed mapping (resampled per seed) turns attributes into a preferred
direction over response *principles*; a deterministic judge measures each
principle on a text (no LM); a user prefers the response whose principle
scores, weighted by their direction, are higher.

Principles (`judge`): verbose (log word count), formal (formal markers and
full forms minus contractions and slang), humorous (exclamations, "haha",
emoticons, jokes), listy (list lines), inquisitive (questions) and polite
("please", "thank", "kindly"). Scores are standardized over a candidate pool
before users weigh them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np

PRINCIPLES = ("verbose", "formal", "humorous", "listy", "inquisitive", "polite")
# Instructions that make a trunk's candidates differ along the principles.
INSTRUCTIONS = (
    "Answer in one short sentence.",
    "Answer formally and in detail, as a professional would.",
    "Answer with a short bulleted list.",
    "Answer casually and with jokes and exclamations!",
    "Answer warmly and politely, and ask a question back.",
    "Answer plainly.",
    "Answer in detail with a numbered list of steps.",
    "Answer in two short, friendly sentences.",
)
_FORMAL = ("therefore", "however", "moreover", "regarding", "furthermore", "consequently", "indeed", "certainly",
           "i would", "it is", "do not", "cannot", "recommend", "consider")
_CASUAL = ("lol", "gonna", "wanna", "yeah", "hey", "kinda", "cool", "awesome", "dude", "totally", "omg")
_HUMOR = ("haha", "lol", "joke", "funny", "hilarious", ":)", ":d", ";)", "xd", "lmao")
_POLITE = ("please", "thank", "kindly", "glad", "happy to", "appreciate", "you're welcome", "hope")


def judge(text: str) -> np.ndarray:
  """Raw principle scores `[len(PRINCIPLES)]` of `text`, by text measurements only."""
  low = text.lower()
  words = re.findall(r"[\w']+", low)
  n = max(len(words), 1)
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  count = lambda terms: sum(low.count(t) for t in terms)
  contractions = sum(1 for w in words if "'" in w)
  return np.array([
      math.log1p(len(words)),
      (count(_FORMAL) - count(_CASUAL) - contractions) / math.sqrt(n),
      (text.count("!") + count(_HUMOR)) / math.sqrt(n),
      sum(1 for l in lines if re.match(r"^([-*\u2022]|\d+[.)])\s", l)) / max(len(lines), 1),
      text.count("?") / math.sqrt(n),
      count(_POLITE) / math.sqrt(n),
  ], np.float64)


def standardize(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`(mean, std)` of raw scores `[N, P]` over a pool. A principle that does not vary in the pool
  (std below 1e-6, e.g. no candidate has a list) gets an infinite std: its z-score is 0 for every
  text, since no pair of the pool tells a user's taste for it."""
  std = scores.std(0)
  return scores.mean(0), np.where(std < 1e-6, np.inf, std)


Z_CLIP = 4.0  # z-scores beyond the pool's +-4 std count as +-4: one outlier text cannot dominate a mean


def zscores(scores: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """Standardized principle scores `[N, P]` of raw `scores` against a pool's `(mean, std)`, clipped
  at +-`Z_CLIP`."""
  return np.clip((scores - mean) / std, -Z_CLIP, Z_CLIP)


@dataclasses.dataclass(frozen=True)
class Users:
  """Simulated users: attributes `[U, A]` in {-1, 0, 1}, the hidden mapping `[A, P]`
  and each user's preferred direction `[U, P]` (unit length)."""
  attributes: np.ndarray
  mapping: np.ndarray
  directions: np.ndarray

  def utility(self, user: int, z: np.ndarray) -> np.ndarray:
    """How much `user` likes texts with standardized principle scores `z` `[N, P]`."""
    return z @ self.directions[user]


def make_users(num_users: int, num_attributes: int = 4, seed: int = 0) -> Users:
  """Users with random attribute vectors and a hidden signed random mapping (a function of `seed`)."""
  rng = np.random.default_rng(seed)
  mapping = rng.choice([-1.0, 1.0], (num_attributes, len(PRINCIPLES))) * rng.uniform(0.3, 1.0,
                                                                                    (num_attributes, len(PRINCIPLES)))
  attrs = rng.choice([-1.0, 0.0, 1.0], (num_users, num_attributes))
  attrs[np.all(attrs == 0, axis=1), 0] = 1.0  # nobody is indifferent
  d = attrs @ mapping
  return Users(attrs, mapping, d / np.linalg.norm(d, axis=1, keepdims=True))


def preference_pairs(utilities: np.ndarray, groups: Sequence[Sequence[int]], rng: np.random.Generator,
                     margin: float = 0.25) -> list[tuple[int, int]]:
  """`(chosen, rejected)` candidate indices: within each group (candidates for one
  prompt), every pair whose utilities differ by more than `margin`, shuffled."""
  pairs = []
  for g in groups:
    for i, a in enumerate(g):
      for b in g[i + 1:]:
        if abs(utilities[a] - utilities[b]) > margin:
          pairs.append((a, b) if utilities[a] > utilities[b] else (b, a))
  order = rng.permutation(len(pairs))
  return [pairs[i] for i in order]


def logistic_accuracy(train_f: np.ndarray, test_f: np.ndarray, l2: float = 1.0, steps: int = 500) -> float:
  """The seed's ablation: logistic regression (no intercept, L2) on the same W − L
  features `[N, A]` of (chosen − rejected), trained on both orders of each pair;
  returns the share of test pairs it orders right."""
  x = np.concatenate([train_f, -train_f])
  y = np.concatenate([np.ones(len(train_f)), np.zeros(len(train_f))])
  scale = np.maximum(np.abs(x).std(0), 1e-6)
  x = x / scale
  w = np.zeros(x.shape[1])
  for _ in range(steps):  # gradient descent on a convex loss: deterministic
    p = 1 / (1 + np.exp(-(x @ w)))
    w -= 0.5 * (x.T @ (p - y) / len(y) + l2 * w / len(y))
  return float(np.mean((test_f / scale) @ w > 0))
