"""The feed's store: posts, each reader's feed and reactions, in SQLite (`RUN/feed.sqlite`).

Tables (schema version 1, kept in `schema_version`; `Store` migrates an older
file on open and refuses a newer one):

  posts      id (opaque, random), key (where it came from: unique), context_key,
             context, text, method ("real" or a generation method), persona (the
             class whose context it answers), reader (only that reader's feed sees
             it: Drift posts steered by their weights; NULL: everyone's), created
  readers    name, created
  feed       reader, position, post_id: a reader's feed, fixed once shown, so a
             reload shows the same posts in the same order
  reactions  reader, post_id, reaction ("up" | "down" | "ai"), updated: one row
             per (reader, post), so a changed vote replaces the old one

The file is in WAL mode (readers never wait for the writer) with
`synchronous=FULL`, and every write is one transaction committed before the
call returns: a vote the server acknowledged survives the process being
killed. Each thread gets its own connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import secrets
import sqlite3
import threading
import time
from typing import Iterable

FILE = "feed.sqlite"  # in the run's directory
REAL = "real"
REACTIONS = ("up", "down", "ai")
SCHEMA_VERSION = 1

# MIGRATIONS[v] takes a file from version v - 1 to v.
MIGRATIONS = {
    1: """
CREATE TABLE posts (
  id TEXT PRIMARY KEY,
  key TEXT NOT NULL UNIQUE,
  context_key TEXT NOT NULL,
  context TEXT NOT NULL,
  text TEXT NOT NULL,
  method TEXT NOT NULL,
  persona TEXT,
  reader TEXT,
  created REAL NOT NULL
);
CREATE INDEX posts_by_reader ON posts (reader);
CREATE TABLE readers (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE feed (
  reader TEXT NOT NULL REFERENCES readers (name),
  position INTEGER NOT NULL,
  post_id TEXT NOT NULL REFERENCES posts (id),
  PRIMARY KEY (reader, position),
  UNIQUE (reader, post_id)
);
CREATE TABLE reactions (
  reader TEXT NOT NULL REFERENCES readers (name),
  post_id TEXT NOT NULL REFERENCES posts (id),
  reaction TEXT NOT NULL CHECK (reaction IN ('up', 'down', 'ai')),
  updated REAL NOT NULL,
  PRIMARY KEY (reader, post_id)
);
""",
}


class StoreError(RuntimeError):
  """A feed database that cannot be used as it is (names the file)."""


class UnknownPost(KeyError):
  """A post id that does not exist, or is not in this reader's view."""


def _rng(*parts) -> random.Random:
  return random.Random(int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little"))


def group_odds(share: float, real: int, generated: int) -> tuple[float, float]:
  """(p_real, p_gen): the chance that a context's group in a feed takes each of its
  `real` real posts, and each of its `generated` generated ones, so that a share
  `share` of the posts is generated in expectation:
  p_gen * generated / (p_real * real + p_gen * generated) = share."""
  if share >= 1 or (real == 0 and share > 0):
    return 0.0, 1.0
  if share <= 0 or generated == 0:
    return 1.0, 0.0
  p_gen = min(1.0, share * real / (generated * (1 - share)))
  return min(1.0, generated * p_gen * (1 - share) / (share * real)), p_gen


class Store:
  """The feed database at `path` (created and migrated on open)."""

  def __init__(self, path: str, *, timeout: float = 30.0):
    self.path, self.timeout = path, timeout
    self._local = threading.local()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    self._migrate()

  @classmethod
  def of_run(cls, workdir: str) -> "Store":
    """The feed database of the run in `workdir`, which a server must have made;
    raises StoreError (saying how to make one) when there is none."""
    path = os.path.join(workdir, FILE)
    if not os.path.isfile(path):
      raise StoreError(f"{path}: no feed database; serve the run (launch/serve.py --workdir={workdir}) and "
                       "react to posts at /feed first")
    return cls(path)

  # --- connections and transactions -------------------------------------------------------

  def _conn(self) -> sqlite3.Connection:
    conn = getattr(self._local, "conn", None)
    if conn is None:
      try:
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
      except sqlite3.DatabaseError as e:
        raise StoreError(f"{self.path}: cannot open as an SQLite feed database: {e}") from e
      self._local.conn = conn
    return conn

  @contextlib.contextmanager
  def _tx(self):
    """One write transaction; BEGIN IMMEDIATE takes the write lock at once, so a
    read-then-write (extending a feed) cannot interleave with another writer."""
    conn = self._conn()
    conn.execute("BEGIN IMMEDIATE")
    try:
      yield conn
    except BaseException:
      conn.execute("ROLLBACK")
      raise
    conn.execute("COMMIT")

  def close(self) -> None:
    """Closes this thread's connection."""
    conn = getattr(self._local, "conn", None)
    if conn is not None:
      conn.close()
      self._local.conn = None

  def _migrate(self) -> None:
    conn = self._conn()
    try:
      mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    except sqlite3.DatabaseError as e:
      raise StoreError(f"{self.path}: not an SQLite database ({e}); move it away to start a new feed") from e
    if mode.lower() != "wal":
      raise StoreError(f"{self.path}: could not switch to WAL mode (journal_mode is {mode!r})")
    with self._tx() as c:
      c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
      row = c.execute("SELECT version FROM schema_version").fetchone()
      version = 0 if row is None else int(row[0])
      if version > SCHEMA_VERSION:
        raise StoreError(f"{self.path}: schema version {version} is newer than this persomux's "
                         f"{SCHEMA_VERSION}; upgrade persomux to use it")
      for v in range(version + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[v].split(";"):
          if statement.strip():
            c.execute(statement)
      if row is None:
        c.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
      else:
        c.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

  def version(self) -> int:
    return int(self._conn().execute("SELECT version FROM schema_version").fetchone()[0])

  # --- posts ------------------------------------------------------------------------------

  def add_posts(self, posts: Iterable[dict]) -> int:
    """Adds posts (dicts with key, context_key, context, text, method and optional
    persona, reader); a key already stored is left as it is. Returns how many were new."""
    now, added = time.time(), 0
    with self._tx() as c:
      for p in posts:
        cur = c.execute(
            "INSERT OR IGNORE INTO posts (id, key, context_key, context, text, method, persona, reader, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (secrets.token_hex(8), p["key"], p["context_key"], p["context"], p["text"], p["method"],
             p.get("persona"), p.get("reader"), now))
        added += cur.rowcount
    return added

  def keys(self) -> set[str]:
    return {r[0] for r in self._conn().execute("SELECT key FROM posts")}

  def post(self, post_id: str) -> dict | None:
    row = self._conn().execute("SELECT * FROM posts WHERE id = ?", (post_id,)).fetchone()
    return None if row is None else dict(row)

  # --- a reader's feed ----------------------------------------------------------------------

  def feed(self, reader: str, n: int, offset: int = 0, *, share: float = 0.5, extend: bool = True,
           seed: int = 0, hold: Iterable[str] = ()) -> list[dict]:
    """Posts `offset` to `offset + n` of `reader`'s feed: `{"id", "context", "text",
    "reaction"}` (the reader's reaction or None), nothing else. With `extend`, a feed
    shorter than that grows (see `_extend`) from the posts the reader has not been
    shown, leaving out contexts in `hold` (those whose posts are still being written:
    one drawn without them would show more real posts than its share)."""
    with self._tx() as c:
      c.execute("INSERT OR IGNORE INTO readers (name, created) VALUES (?, ?)", (reader, time.time()))
      have = c.execute("SELECT COUNT(*) FROM feed WHERE reader = ?", (reader,)).fetchone()[0]
      if extend and have < offset + n:
        self._extend(c, reader, have, offset + n, share, seed, set(hold))
      rows = c.execute(
          "SELECT p.id, p.context, p.text, r.reaction FROM feed f JOIN posts p ON p.id = f.post_id "
          "LEFT JOIN reactions r ON r.reader = f.reader AND r.post_id = f.post_id "
          "WHERE f.reader = ? ORDER BY f.position LIMIT ? OFFSET ?", (reader, n, offset)).fetchall()
    return [dict(r) for r in rows]

  @staticmethod
  def _extend(c, reader: str, start: int, end: int, share: float, seed: int, hold: set[str]) -> None:
    """Appends posts to `reader`'s feed until it holds `end` (or the pool runs out).

    The feed grows one context at a time, contexts the reader has not seen first:
    a context's group takes each of its real posts with probability p_real and
    each generated one with probability p_gen (`group_odds`: a share `share` of
    generated posts in expectation), in a shuffled order. So one context's real
    and generated posts meet the same reader (what preference pairs need), and
    neither a post's place nor its group's make-up tells where it came from. Once
    every context has been seen, the leftovers follow one at a time. Every draw
    is seeded by (seed, reader, position): a feed is the same however it is paged."""
    unseen: dict[str, dict] = {}
    for p in c.execute("SELECT id, method, context_key FROM posts WHERE (reader IS NULL OR reader = ?) "
                       "AND id NOT IN (SELECT post_id FROM feed WHERE reader = ?) ORDER BY id", (reader, reader)):
      if p["context_key"] in hold:
        continue
      by_method = unseen.setdefault(p["context_key"], {})
      by_method.setdefault(p["method"], []).append(p["id"])
    visited = {r[0] for r in c.execute("SELECT DISTINCT p.context_key FROM feed f JOIN posts p ON p.id = f.post_id "
                                       "WHERE f.reader = ?", (reader,))}
    position = start
    while position < end and unseen:
      rng = _rng(seed, reader, position)
      fresh = sorted(k for k in unseen if k not in visited)
      key = rng.choice(fresh or sorted(unseen))
      by_method = unseen[key]
      if fresh:
        visited.add(key)
        real = by_method.get(REAL, [])
        generated = [i for m, ids in sorted(by_method.items()) if m != REAL for i in ids]
        p_real, p_gen = group_odds(share, len(real), len(generated))
        group = [i for i in real if rng.random() < p_real] + [i for i in generated if rng.random() < p_gen]
        rng.shuffle(group)
      else:
        allowed = [m for m in sorted(by_method) if (m == REAL and share < 1) or (m != REAL and share > 0)]
        if not allowed:
          del unseen[key]
          continue
        method = REAL if REAL in allowed else rng.choice(allowed)
        group = [rng.choice(by_method[method])]
      for post_id in group:
        c.execute("INSERT INTO feed (reader, position, post_id) VALUES (?, ?, ?)", (reader, position, post_id))
        position += 1
        for ids in by_method.values():
          if post_id in ids:
            ids.remove(post_id)
      for m in [m for m, ids in by_method.items() if not ids]:
        del by_method[m]
      if not by_method:
        del unseen[key]

  # --- reactions --------------------------------------------------------------------------

  def react(self, reader: str, post_id: str, reaction: str | None) -> None:
    """Sets `reader`'s reaction to a post (None removes it), in one transaction.
    Raises UnknownPost for a post that does not exist or is another reader's."""
    if reaction is not None and reaction not in REACTIONS:
      raise ValueError(f"reaction {reaction!r}: expected one of {', '.join(REACTIONS)}")
    with self._tx() as c:
      row = c.execute("SELECT reader FROM posts WHERE id = ?", (post_id,)).fetchone()
      if row is None or row[0] not in (None, reader):
        raise UnknownPost(post_id)
      c.execute("INSERT OR IGNORE INTO readers (name, created) VALUES (?, ?)", (reader, time.time()))
      if reaction is None:
        c.execute("DELETE FROM reactions WHERE reader = ? AND post_id = ?", (reader, post_id))
      else:
        c.execute("INSERT INTO reactions (reader, post_id, reaction, updated) VALUES (?, ?, ?, ?) "
                  "ON CONFLICT (reader, post_id) DO UPDATE SET reaction = excluded.reaction, "
                  "updated = excluded.updated", (reader, post_id, reaction, time.time()))

  # --- what results and export read -------------------------------------------------------

  def method_counts(self) -> dict[str, dict[str, int]]:
    """Per method: `posts` (in the pool), `shown` (feed entries), `readers` (who
    reacted), and the count of each reaction."""
    conn = self._conn()
    out: dict[str, dict[str, int]] = {}

    def row(method):
      return out.setdefault(method, {"posts": 0, "shown": 0, "readers": 0, **{r: 0 for r in REACTIONS}})

    for method, n in conn.execute("SELECT method, COUNT(*) FROM posts GROUP BY method"):
      row(method)["posts"] = n
    for method, n in conn.execute("SELECT p.method, COUNT(*) FROM feed f JOIN posts p ON p.id = f.post_id "
                                  "GROUP BY p.method"):
      row(method)["shown"] = n
    for method, n in conn.execute("SELECT p.method, COUNT(DISTINCT r.reader) FROM reactions r "
                                  "JOIN posts p ON p.id = r.post_id GROUP BY p.method"):
      row(method)["readers"] = n
    for method, reaction, n in conn.execute("SELECT p.method, r.reaction, COUNT(*) FROM reactions r "
                                            "JOIN posts p ON p.id = r.post_id GROUP BY p.method, r.reaction"):
      row(method)[reaction] = n
    return out

  def reactions(self) -> list[dict]:
    """Every reaction with its post: reader, reaction, post_id, context_key, context,
    text, method, persona; ordered by reader, context and post."""
    rows = self._conn().execute(
        "SELECT r.reader, r.reaction, r.post_id, p.context_key, p.context, p.text, p.method, p.persona "
        "FROM reactions r JOIN posts p ON p.id = r.post_id ORDER BY r.reader, p.context_key, r.post_id")
    return [dict(r) for r in rows]

  def readers(self) -> list[str]:
    return [r[0] for r in self._conn().execute("SELECT name FROM readers ORDER BY name")]
