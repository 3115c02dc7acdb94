"""The feed's HTTP face, added to the persona server's app.

  GET  /feed                     the page (plain HTML and a little JavaScript, static/)
  GET  /feed/posts?reader=NAME&n=K[&offset=O]
                                 `{"reader", "posts": [{"id", "context", "text", "reaction"}],
                                 "writing"}`: posts O..O+K of NAME's feed and the reader's
                                 reaction to each; `writing`: posts still being generated
  POST /feed/react               `{"reader", "post_id", "reaction": "up" | "down" | "ai" | "none"}`
                                 ("none" takes a reaction back)
  GET  /feed/results             per-method results: JSON, or an HTML view for a browser
                                 (`?format=json|html` chooses)
  GET  /feed/results.png         the results plot

A post's method (or persona) is in no response a reader gets: posts carry only
an opaque random id, their context and text. Errors are the server's JSON errors:
unknown post 404, bad reaction or reader name 422.
"""

from __future__ import annotations

import html
import io
import os
import string
from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from persomux.feed import results as results_lib
from persomux.feed.store import UnknownPost

READER = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"  # also a file name: RUN/drift/READER.json
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_STATIC_TYPES = {"feed.js": "text/javascript", "feed.css": "text/css"}


class React(BaseModel):
  reader: str = Field(pattern=READER)
  post_id: str = Field(min_length=1, max_length=64)
  reaction: Literal["up", "down", "ai", "none"]


def _read(name: str) -> str:
  with open(os.path.join(STATIC, name), encoding="utf-8") as f:
    return f.read()


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
  return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": code}},
                      status_code=status)


def results_page(summary: dict) -> str:
  return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>persomux feed: results</title><link rel="stylesheet" href="/feed/static/feed.css"></head>
<body><header><h1>Feed results</h1><a href="/feed">Back to the feed</a></header>
<p class="note">{results_lib.count(summary['reactions'], 'reaction')} from
{results_lib.count(summary['readers'] or 0, 'reader')}.
Like rate = up / (up + down); marked as AI = ai / all reactions (on real posts: false alarms);
95% Wilson intervals. JSON: <a href="/feed/results?format=json">/feed/results?format=json</a>.</p>
{results_lib.to_html(summary)}
<p><img class="plot" src="/feed/results.png" alt="like rate and marked-as-AI rate per method"></p>
</body></html>"""


def add_routes(app: FastAPI, feed) -> None:
  """Adds the feed's routes to `app`; `feed` is a `pool.Feed`, or a string saying
  why this server has no feed (its routes then answer 503 with that reason)."""
  if isinstance(feed, str):
    reason = feed

    @app.get("/feed")
    @app.get("/feed/{rest:path}")
    async def unavailable(rest: str = ""):
      return _error(503, f"the feed is off on this server: {reason}", "feed_off")
    return

  page = string.Template(_read("feed.html")).substitute(
      page=20, where=html.escape(feed.where),
      results='<a href="/feed/results">Results</a>' if feed.public_results else "")
  static = {name: _read(name) for name in _STATIC_TYPES}

  @app.get("/feed", response_class=HTMLResponse)
  async def feed_page():
    return HTMLResponse(page)

  @app.get("/feed/static/{name}")
  async def feed_static(name: str):
    if name not in static:
      return _error(404, f"no static file {name!r}")
    return Response(static[name], media_type=_STATIC_TYPES[name])

  @app.get("/feed/posts")
  def feed_posts(reader: str = Query(pattern=READER), n: int = Query(20, ge=1, le=200),
                 offset: int = Query(0, ge=0)):
    return feed.posts(reader, n, offset)

  @app.post("/feed/react")
  def feed_react(body: React):
    reaction = None if body.reaction == "none" else body.reaction
    try:
      feed.store.react(body.reader, body.post_id, reaction)
    except UnknownPost:
      return _error(404, f"no post {body.post_id!r} for reader {body.reader!r} (GET /feed/posts?reader=...)",
                    "post_not_found")
    return {"post_id": body.post_id, "reaction": reaction}

  def summary() -> dict:
    return results_lib.summarize(feed.store.method_counts(), readers=len(feed.store.readers()))

  def private():
    return _error(404, "this server keeps the feed's results private (--nofeed_results); run "
                  "launch/feed_report.py --workdir=RUN", "results_private")

  @app.get("/feed/results")
  def feed_results(request: Request, format: Literal["json", "html"] | None = None):
    if not feed.public_results:
      return private()
    s = summary()
    wants_html = format == "html" or (format is None and "text/html" in request.headers.get("accept", ""))
    if wants_html:
      return HTMLResponse(results_page(s))
    return {**s, "pool": {"contexts": len(feed.contexts), "methods": feed.methods,
                          "writing": feed.writer.pending("pool"), "generated": dict(feed.writer.stats),
                          "error": feed.writer.error}}

  @app.get("/feed/results.png")
  def feed_plot():
    if not feed.public_results:
      return private()
    buf = io.BytesIO()
    results_lib.plot(summary(), buf)
    return Response(buf.getvalue(), media_type="image/png")
