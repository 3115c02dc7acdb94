"""Drift: a user's preferences as weights over attribute system prompts, from a few pairs.

Drift (`../shared/seeds/drift_decoding.txt`) says *what this listener likes*.
A small LM π that shares the generator's tokenizer scores each preference
pair (x, y_w, y_l) under a base system prompt s₀ ("You are an AI assistant.")
and under each attribute's prompt s_i, in its chat format, summing the
log-probabilities of the response tokens:

    W_ij = log π(y_w | x, s_i) − log π(y_w | x, s₀)
    L_ij = log π(y_l | x, s_i) − log π(y_l | x, s₀)
    v_i  = Σ_j (W_ij − L_ij),   p = v / ‖v‖₂

and keeps the K attributes with the largest |p_i| (Algorithm 1; no
gradients). More pairs only add to the sums (`fit(..., previous=)`). A pair is
predicted to prefer y_w when Σ_{i in top K} p_i (W_ij − L_ij) > 0.

`DEFAULT_ATTRIBUTES` is the seed's Table 6 (41 attributes).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Sequence

import numpy as np

from persomux import data as data_lib
from persomux import sampling, train

BASE_PROMPT = "You are an AI assistant."

DEFAULT_ATTRIBUTES: dict[str, str] = {
    "Creative": "You are a creative AI assistant.",
    "Formal": "You are an AI assistant with a formal tone.",
    "Analytic": "You are an analytic AI assistant.",
    "Concise": "You are an AI assistant with a concise response rather than verbosity.",
    "Empathetic": "You are an empathetic AI assistant.",
    "Vivid": "You are an AI assistant using rhetorical devices.",
    "Sycophant": "You are a sycophant AI assistant.",
    "Modest": "You are a modest and polite AI assistant.",
    "Old-fashioned": "You are an AI assistant using old-fashioned English.",
    "Engineer": "You are an AI assistant with expertise in engineering.",
    "Meritocratic": "You are a meritocratic AI assistant.",
    "Persuasive": "You are a persuasive AI assistant.",
    "Myopic": "You are a myopic AI assistant.",
    "Emotion": "You are an emotional AI assistant.",
    "Principled": "You are an AI assistant that upholds principles and rules above all else.",
    "Humor": "You are a humorous AI assistant.",
    "Hedonist": "You are an AI assistant that prioritizes maximizing pleasure and joy while minimizing pain "
                "and discomfort.",
    "Energy": "You are an energetic AI assistant.",
    "Utilitarian": "You are an AI assistant that prioritizes the greatest good for the greatest number of people.",
    "Code": "You are an AI assistant with expertise in computer science.",
    "Realist": "You are an AI assistant that focuses on practical, realistic, and actionable advice.",
    "Easy": "You are an AI assistant using easy-to-understand words.",
    "Pessimistic": "You are an AI assistant that views situations through a skeptical or cautious perspective.",
    "Direct": "You are an AI assistant with a firm and directive tone.",
    "Storyteller": "You are an AI assistant that loves explaining things through stories and anecdotes.",
    "Social": "You are an AI assistant with expertise in sociology.",
    "Flexible": "You are an AI assistant that values flexibility over strict adherence to principles.",
    "Western": "You are an AI assistant with western cultures.",
    "Spontaneous": "You are an AI assistant that enjoys handling tasks spontaneously without making plans.",
    "Eastern": "You are an AI assistant with eastern cultures.",
    "Collectivist": "You are an AI assistant that prioritizes the group over the individual.",
    "Respect": "You are a respectful AI assistant.",
    "Individualistic": "You are an AI assistant that prioritizes the individual over the group.",
    "Internet Slang": "You are an AI assistant that communicates using internet slang.",
    "Exclamatory": "You are an AI assistant that enjoys using exclamations frequently.",
    "Proverb": "You are an AI assistant that communicates using proverbs.",
    "Conspiracy": "You are an AI assistant that enjoys discussing conspiracy theories.",
    "Critical": "You are an AI assistant that enjoys being critical and argumentative.",
    "Tech Industry Priority": "You are an AI assistant that prioritizes technological and industrial advancement "
                              "above all else.",
    "Vague": "You are an AI assistant that enjoys speaking indirectly and ambiguously.",
    "Eco-friendly": "You are an AI assistant that loves and protects the environment.",
}


class PairsError(ValueError):
  """A preference-pairs file that cannot be read as asked."""


@dataclasses.dataclass(frozen=True)
class Pair:
  prompt: str
  chosen: str
  rejected: str
  user: str | None = None


def load_pairs(path: str) -> list[Pair]:
  """Pairs from JSONL: one object per line with `prompt`, `chosen`, `rejected`
  (non-empty strings) and an optional `user`. Errors name the file and line."""
  if not os.path.isfile(path):
    raise PairsError(f"{path}: no such file; expected JSONL preference pairs")
  pairs = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise PairsError(f"{path}:{n}: not JSON ({e.msg}); expected one object per line") from None
      if not isinstance(row, dict):
        raise PairsError(f"{path}:{n}: a {type(row).__name__}; expected an object with prompt, chosen, rejected")
      for field in ("prompt", "chosen", "rejected"):
        if not isinstance(row.get(field), str) or not row[field].strip():
          raise PairsError(f"{path}:{n}: field {field!r} is missing or empty; expected a non-empty string")
      user = row.get("user")
      if user is not None and not isinstance(user, str):
        raise PairsError(f"{path}:{n}: field 'user' is a {type(user).__name__}; expected a string")
      pairs.append(Pair(row["prompt"], row["chosen"], row["rejected"], user))
  if not pairs:
    raise PairsError(f"{path}: no pairs (the file is empty); expected JSONL with prompt, chosen, rejected")
  return pairs


def by_user(pairs: Sequence[Pair]) -> dict[str | None, list[Pair]]:
  out: dict[str | None, list[Pair]] = {}
  for p in pairs:
    out.setdefault(p.user, []).append(p)
  return out


@dataclasses.dataclass
class DriftWeights:
  """A user's Drift weights, with what they came from."""
  attributes: dict[str, str]  # name -> system prompt, in order
  base_prompt: str
  v: np.ndarray  # [A] Σ_j (W_ij − L_ij)
  w_sum: np.ndarray  # [A] Σ_j W_ij
  l_sum: np.ndarray  # [A] Σ_j L_ij
  num_pairs: int
  k: int = 7
  model: str | None = None
  user: str | None = None

  @property
  def names(self) -> list[str]:
    return list(self.attributes)

  @property
  def p(self) -> np.ndarray:
    """v / ‖v‖₂ over every attribute (zeros when v is 0)."""
    norm = float(np.linalg.norm(self.v))
    return self.v / norm if norm > 0 else np.zeros_like(self.v)

  @property
  def selected(self) -> list[int]:
    """Indices of the K attributes with the largest |p_i| (ties: attribute order)."""
    order = sorted(range(len(self.v)), key=lambda i: (-abs(float(self.p[i])), i))
    return sorted(order[:min(self.k, len(order))])

  def top(self) -> dict[str, float]:
    """The K kept attributes and their weights p_i."""
    p = self.p
    return {self.names[i]: float(p[i]) for i in self.selected}

  def to_json(self) -> dict:
    p = self.p
    return {"format": "persomux.drift/1", "user": self.user, "model": self.model, "k": self.k,
            "num_pairs": self.num_pairs, "base_prompt": self.base_prompt,
            "weights": self.top(),
            "attributes": [{"name": n, "prompt": s, "p": float(p[i]), "v": float(self.v[i]),
                            "w_minus_l": float(self.v[i]), "w": float(self.w_sum[i]), "l": float(self.l_sum[i]),
                            "selected": i in self.selected}
                           for i, (n, s) in enumerate(self.attributes.items())]}

  @classmethod
  def from_json(cls, obj: Mapping, source: str = "weights") -> "DriftWeights":
    if obj.get("format") != "persomux.drift/1":
      raise ValueError(f"{source}: format {obj.get('format')!r}; expected 'persomux.drift/1' (launch/drift.py fit)")
    try:
      attrs = obj["attributes"]
      return cls({a["name"]: a["prompt"] for a in attrs}, obj["base_prompt"],
                 np.array([a["v"] for a in attrs], np.float64), np.array([a["w"] for a in attrs], np.float64),
                 np.array([a["l"] for a in attrs], np.float64), int(obj["num_pairs"]), int(obj["k"]),
                 obj.get("model"), obj.get("user"))
    except (KeyError, TypeError) as e:
      raise ValueError(f"{source}: malformed Drift weights ({e!r})") from None

  def save(self, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(self.to_json(), f, indent=1)
    os.replace(path + ".tmp", path)

  @classmethod
  def load(cls, path: str) -> "DriftWeights":
    with open(path) as f:
      return cls.from_json(json.load(f), source=path)


def _prompt_ids(tokenizer, system: str, prompt: str) -> list[int]:
  if getattr(tokenizer, "chat_template", None):
    text = data_lib.render_chat(tokenizer, system, [{"role": "user", "content": prompt}])
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
  return list(tokenizer(f"{system}\n\n{prompt}\n", add_special_tokens=True)["input_ids"])


def logprobs(model, tokenizer, systems: Sequence[str], prompts: Sequence[str], responses: Sequence[str], *,
             batch_size: int = 16, max_len: int = 1024, progress: str = "") -> np.ndarray:
  """`[S, N]`: log π(response_n | prompt_n, system_s) summed over the response tokens,
  in the tokenizer's chat format (no chat template: "system\n\nprompt\n"). Prompts
  longer than the budget lose their oldest tokens; responses keep their first.
  `progress` names a progress bar over the batches."""
  examples = []
  for s in systems:
    for x, y in zip(prompts, responses):
      pid = _prompt_ids(tokenizer, s, x)
      yid = list(tokenizer(y, add_special_tokens=False)["input_ids"])[:max_len // 2]
      keep = pid[-(max_len - len(yid)):]
      examples.append(data_lib.Example(np.asarray(keep, np.int32), np.zeros(0, np.int32),
                                       np.asarray(yid, np.int32), 0))
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  nll, _ = train.score_examples(model, examples, batch_size=batch_size, max_len=max_len, pad_id=pad,
                                progress=progress)
  return -nll.reshape(len(systems), len(prompts))


def response_logprobs(model, tokenizer, systems: Sequence[str], pairs: Sequence[Pair], **kw
                      ) -> tuple[np.ndarray, np.ndarray]:
  """`(chosen, rejected)` `[S, N]`: `logprobs` of each pair's two responses."""
  lp = logprobs(model, tokenizer, systems, [p.prompt for p in pairs for _ in (0, 1)],
                [y for p in pairs for y in (p.chosen, p.rejected)], **kw)
  return lp[:, 0::2], lp[:, 1::2]


def differences(model, tokenizer, pairs: Sequence[Pair], attributes: Mapping[str, str], base_prompt: str,
                **kw) -> tuple[np.ndarray, np.ndarray]:
  """`(W, L)` `[A, N]`: each attribute's log-probability gain over the base prompt,
  for each pair's chosen (W) and rejected (L) response."""
  chosen, rejected = response_logprobs(model, tokenizer, [base_prompt, *attributes.values()], pairs, **kw)
  return chosen[1:] - chosen[:1], rejected[1:] - rejected[:1]


def fit(model, tokenizer, pairs: Sequence[Pair], attributes: Mapping[str, str] | None = None, *, k: int = 7,
        base_prompt: str = BASE_PROMPT, previous: DriftWeights | None = None, model_name: str | None = None,
        user: str | None = None, **kw) -> DriftWeights:
  """Drift weights of one user from their preference `pairs` (Algorithm 1).

  `previous` (weights fitted on earlier pairs with the same attributes and base
  prompt) is added to: more pairs only extend the sums.
  """
  if not pairs:
    raise ValueError("fit needs at least one preference pair")
  attributes = dict(DEFAULT_ATTRIBUTES if attributes is None else attributes)
  if not attributes:
    raise ValueError("fit needs at least one attribute")
  if k < 1:
    raise ValueError(f"k={k}; expected at least 1")
  if previous is not None and (previous.attributes != attributes or previous.base_prompt != base_prompt):
    raise ValueError("previous weights were fitted with other attributes or another base prompt; refit from "
                     "all pairs instead")
  w, l = differences(model, tokenizer, pairs, attributes, base_prompt, **kw)
  v, ws, ls = (w - l).sum(1), w.sum(1), l.sum(1)
  n = len(pairs)
  if previous is not None:
    v, ws, ls, n = v + previous.v, ws + previous.w_sum, ls + previous.l_sum, n + previous.num_pairs
  return DriftWeights(attributes, base_prompt, v, ws, ls, n, k, model_name, user)


def predict(weights: DriftWeights, model, tokenizer, pairs: Sequence[Pair], **kw) -> np.ndarray:
  """Scores `[N]`, Σ_{i in top K} p_i (W_ij − L_ij): above 0 predicts `chosen` is preferred."""
  keep = weights.selected
  names = weights.names
  attrs = {names[i]: weights.attributes[names[i]] for i in keep}
  w, l = differences(model, tokenizer, pairs, attrs, weights.base_prompt, **kw)
  return weights.p[keep] @ (w - l)


def streams(small_model, tokenizer, weights: Sequence[DriftWeights | None], messages: Sequence[str], *,
            beta: float = 0.5) -> sampling.LogitStreams:
  """Drift decoding (Algorithm 2) for a batch: row r is steered by `weights[r]`
  (None: not steered) given its user message `messages[r]`.

  Each row gets the small LM's base stream (s₀) and one stream per kept
  attribute (s_i), all in the small LM's chat format; rows with fewer kept
  attributes are padded with weight-0 streams. Pass the result to
  `persomux.generate(..., logit_streams=)`: every step then samples from
  h_LLM + (1/β) Σ_i p_i (h_i − h_base). Defaults: β = 0.5 (top-p 0.9 is the
  sampler's to set).
  """
  if len(weights) != len(messages):
    raise ValueError(f"{len(weights)} Drift weights for {len(messages)} messages; give one (or None) per row")
  width = max([len(w.selected) for w in weights if w is not None] or [1])
  ids, rows = [], []
  for w, x in zip(weights, messages):
    base = w.base_prompt if w is not None else BASE_PROMPT
    kept = [] if w is None else [(w.names[i], float(w.p[i])) for i in w.selected]
    prompts = [base] + [w.attributes[n] for n, _ in kept] + [base] * (width - len(kept))
    ids.append([_prompt_ids(tokenizer, s, x) for s in prompts])
    rows.append([p for _, p in kept] + [0.0] * (width - len(kept)))
  return sampling.LogitStreams(small_model, ids, np.asarray(rows, np.float32), beta)
