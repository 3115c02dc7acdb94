"""Celebrity tweets: one class per author.

Input is a CSV of tweets with an author column and a text column (names are
configurable: `name`/`text`, or `author`/`content` as in Sakib 2023's
"Top 1000 Twitter celebrity tweets"). Tweets are cleaned (HTML entities
unescaped, a leading `RT @user:` marker and URLs removed, whitespace
collapsed); at most `max_per_class` per author are kept (paper: 100), chosen by
a seeded sample per author and kept in file order.

The context of each tweet is a topic, "Write a tweet about: w1, w2, w3",
where the words come from keyword extraction on the cleaned tweet itself
(`keyword_topic`), not from a language model; a tweet with no keyword has no
context. `group` is None.

Skipped items are counted by reason: "missing author", "empty after
cleaning", "too short" (fewer than `min_words` words after cleaning) and
"over per-class cap".
"""

from __future__ import annotations

import collections
import csv
import html
import os
import random
import re
import sys

from persomux.data import DataError, Record

TOPIC_PREFIX = "Write a tweet about: "
_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_RETWEET = re.compile(r"^\s*RT\s+@\w+:?\s*")
_TOKEN = re.compile(r"[@#]?\w+(?:'\w+)*")

# A small English stopword list; contraction remnants ("im", "dont") appear because tweets drop apostrophes.
_STOPWORD_TEXT = """
a about above after again against all also am an and any are aren't as at be because been before
being below between both but by can can't cannot could couldn't did didn't do does doesn't doing
don't down during each even ever every few for from further get gets got had hadn't has hasn't have
haven't having he her here hers herself him himself his how i if in into is isn't it it's its itself
just let like made make many may me might more most much must my myself need never new no nor not
now of off on once one only or other our ours ourselves out over own really said same say says see
she should shouldn't since so some still such than that the their theirs them themselves then there
these they this those through thus to today too under until up upon us very via want was wasn't we
well were weren't what when where which while who whom why will with won't would wouldn't yes yet
you your yours yourself yourselves im ive dont cant wont thats youre amp rt
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def clean_tweet(text: str) -> str:
  """Unescapes HTML entities, drops a leading retweet marker and URLs, collapses whitespace."""
  text = html.unescape(text)
  text = _RETWEET.sub("", text)
  text = _URL.sub(" ", text)
  return " ".join(text.split())


def keyword_topic(text: str, k: int = 3) -> str:
  """The `k` most frequent informative words of `text`, joined by ", ".

  A word is a lowercase alphabetic token of length >= 3 that is not in
  `STOPWORDS`; @mentions are ignored, a hashtag counts as its word and a
  possessive "'s" is dropped. Ties in frequency keep first-occurrence order.
  Returns "" when there is no such word.
  """
  counts: dict[str, int] = {}
  for tok in _TOKEN.findall(text):
    if tok.startswith("@"):
      continue
    w = tok.lstrip("#").lower()
    w = w.removesuffix("'s")
    if len(w) >= 3 and w.isalpha() and w not in STOPWORDS:
      counts[w] = counts.get(w, 0) + 1  # dicts keep first-occurrence order; sorted() is stable
  return ", ".join(sorted(counts, key=lambda w: -counts[w])[:k])


_UNDECODABLE = re.compile("[\udc80-\udcff]")


def read_tweets(csv_path: str, *, author_column: str = "name", text_column: str = "text",
                max_per_class: int = 100, seed: int = 0,
                min_words: int = 3) -> tuple[list[Record], collections.Counter]:
  """Class-labelled records from a tweets CSV (see module docstring).

  Returns `(records, skipped)`, records in file order. Raises `DataError` for
  a missing or empty file, a missing column (listing the columns present), or
  when no tweet survives cleaning.
  """
  if not os.path.isfile(csv_path):
    raise DataError(f"{csv_path}: no such file; expected a CSV of tweets")
  if os.path.getsize(csv_path) == 0:
    raise DataError(f"{csv_path}: file is empty; expected a CSV with columns "
                    f"{author_column!r} and {text_column!r}")
  csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # some exports hold very long cells
  skipped: collections.Counter = collections.Counter()
  kept: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)  # author -> (row, tweet)
  # surrogateescape keeps undecodable bytes visible, so such rows are counted, not mangled.
  with open(csv_path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
    reader = csv.DictReader(f)
    columns = reader.fieldnames or []
    for col in (author_column, text_column):
      if col not in columns:
        raise DataError(f"{csv_path}: missing column {col!r}; columns are {columns}")
    for n, row in enumerate(reader):
      if any(_UNDECODABLE.search(v or "") for v in (row.get(author_column), row.get(text_column))):
        skipped["undecodable bytes"] += 1
        continue
      author = (row.get(author_column) or "").strip()
      if not author:
        skipped["missing author"] += 1
        continue
      tweet = clean_tweet(row.get(text_column) or "")
      if not tweet:
        skipped["empty after cleaning"] += 1
      elif len(tweet.split()) < min_words:
        skipped["too short"] += 1
      else:
        kept[author].append((n, tweet))
  rows = []
  for author, tweets in kept.items():
    if len(tweets) > max_per_class:
      # Seeded per author, so one author's sample does not depend on the others'.
      tweets = random.Random(f"{seed}:{author}").sample(tweets, max_per_class)
      skipped["over per-class cap"] += len(kept[author]) - max_per_class
    rows += [(n, author, t) for n, t in tweets]
  if not rows:
    raise DataError(f"{csv_path}: no tweet survives cleaning (skipped: {dict(skipped)}); expected "
                    f"rows with {author_column!r} and {text_column!r}")
  records = []
  for _, author, tweet in sorted(rows):
    topic = keyword_topic(tweet)
    records.append(Record(cls=author, text=tweet, context=TOPIC_PREFIX + topic if topic else None))
  return records, skipped
