"""Cornell Movie-Dialogs Corpus: one class per movie character.

Input is the corpus directory as distributed (Danescu-Niculescu-Mizil and Lee
2011): `movie_lines.txt`, `movie_conversations.txt`,
`movie_characters_metadata.txt` and `movie_titles_metadata.txt`, fields
separated by ` +++$+++ `, text in ISO-8859-1. All four files must exist.

A class is a character, labelled `"{name} ({movie title})"` (names repeat
across movies; the title comes from the titles metadata, else the characters
metadata, else the movie id). Every line of a conversation is an example
whose `text` is the line and whose `context` is up to `max_context_lines`
previous lines of that conversation as `"NAME: text"` joined by newlines; the
opening line of a conversation has no context. `group` is the movie id, so a
movie's characters never straddle the pretraining/finetuning split.

Skipped items are counted by reason:
  "malformed line"                      a line of any file with the wrong field count
                                        (or a conversation without line ids)
  "conversation with missing lines"     a conversation naming a line id absent from
                                        movie_lines.txt (partial copies of the corpus)
  "empty text"                          a line with no text; it is neither an example
                                        nor part of any context
  "character in too few conversations"  records (not characters) dropped because their
                                        speaker appears in fewer than `min_conversations`
                                        read conversations (the paper's scene filter)
"""

from __future__ import annotations

import collections
import os
import re

from persomux.data import DataError, Record

SEP = " +++$+++ "
LINES = "movie_lines.txt"
CONVERSATIONS = "movie_conversations.txt"
CHARACTERS = "movie_characters_metadata.txt"
TITLES = "movie_titles_metadata.txt"
_LINE_ID = re.compile(r"L\d+")


def _rows(path: str, n_fields: int, skipped: collections.Counter, *, allow_empty: bool = True):
  """Yields the `n_fields` fields of each well-formed line of a corpus file."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file; expected a Cornell Movie-Dialogs Corpus file "
                    f"with {n_fields} fields separated by {SEP.strip()!r}")
  if not allow_empty and os.path.getsize(path) == 0:
    raise DataError(f"{path}: file is empty; expected lines with {n_fields} fields separated by {SEP.strip()!r}")
  # ISO-8859-1 maps every byte to a character, so decoding cannot fail.
  with open(path, encoding="iso-8859-1", newline="") as f:
    for line in f:
      # Strip only the line break: an empty last field leaves a trailing separator with its space.
      line = line.rstrip("\r\n")
      if not line.strip():
        continue
      fields = line.split(SEP)
      if len(fields) != n_fields:
        skipped["malformed line"] += 1
        continue
      yield fields


def read_cornell(directory: str, *, min_conversations: int = 5,
                 max_context_lines: int = 4) -> tuple[list[Record], collections.Counter]:
  """Class-labelled records from the Cornell corpus directory (see module docstring).

  Returns `(records, skipped)`, records in conversation-file order. Raises
  `DataError` for a missing directory or file, an empty movie_lines.txt, or
  when no record survives.
  """
  if not os.path.isdir(directory):
    raise DataError(f"{directory}: no such directory; expected the Cornell Movie-Dialogs Corpus "
                    f"({LINES}, {CONVERSATIONS}, {CHARACTERS}, {TITLES})")
  path = lambda name: os.path.join(directory, name)
  skipped: collections.Counter = collections.Counter()

  titles = {mid.strip(): title.strip() for mid, title, *_ in _rows(path(TITLES), 6, skipped)}
  char_names, char_titles = {}, {}
  for cid, name, mid, title, *_ in _rows(path(CHARACTERS), 6, skipped):
    char_names[cid.strip()] = name.strip()
    char_titles.setdefault(mid.strip(), title.strip())

  # line id -> (character id, movie id, name, text)
  lines = {}
  for lid, cid, mid, name, text in _rows(path(LINES), 5, skipped, allow_empty=False):
    lines[lid.strip()] = (cid.strip(), mid.strip(), name.strip(), text.strip())
  if not lines:
    raise DataError(f"{path(LINES)}: no line has the 5 fields 'lineID{SEP}characterID{SEP}movieID{SEP}"
                    f"name{SEP}text' (skipped: {dict(skipped)})")

  conversations = []
  for _, _, mid, ids in _rows(path(CONVERSATIONS), 4, skipped):
    ids = _LINE_ID.findall(ids)
    if not ids:
      skipped["malformed line"] += 1
    elif any(i not in lines for i in ids):
      skipped["conversation with missing lines"] += 1
    else:
      conversations.append((mid.strip(), ids))

  def label(cid: str, mid: str, line_name: str) -> str:
    title = titles.get(mid) or char_titles.get(mid) or mid
    return f"{char_names.get(cid) or line_name or cid} ({title})"

  speakers_of: dict[str, set[str]] = collections.defaultdict(set)  # character id -> conversation indices
  examples = []  # (character id, record)
  for n, (mid, ids) in enumerate(conversations):
    history: list[str] = []
    for i in ids:
      cid, line_mid, name, text = lines[i]
      if not text:
        skipped["empty text"] += 1
        continue
      speakers_of[cid].add(n)
      context = "\n".join(history[-max_context_lines:]) if history and max_context_lines > 0 else None
      examples.append((cid, Record(cls=label(cid, line_mid or mid, name), text=text, context=context,
                                   group=mid)))
      history.append(f"{name or char_names.get(cid) or cid}: {text}")

  records = []
  for cid, r in examples:
    if len(speakers_of[cid]) < min_conversations:
      skipped["character in too few conversations"] += 1
    else:
      records.append(r)
  if not records:
    raise DataError(f"{directory}: no Cornell record survives (min_conversations={min_conversations}; "
                    f"skipped: {dict(skipped)})")
  return records, skipped
