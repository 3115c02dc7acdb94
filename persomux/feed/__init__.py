"""The preference feed: readers react to a mix of real and generated posts.

- `store`: SQLite (`RUN/feed.sqlite`): posts, each reader's feed, reactions.
- `pool`: the contexts and the posts each method generates for them (through the
  serving engine, in the background).
- `web`: the page and the JSON API, added to the persona server (`launch/serve.py`).
- `results`: like and mark-as-AI rates per method, with Wilson intervals and a plot
  (`launch/feed_report.py`).
- `export`: each reader's reactions as Drift pairs and add_personas records
  (`launch/feed_export.py`).

`store`, `results` and `export` need neither JAX nor the server.
"""
