"""The preference feed, served for real: `launch/serve.py` on a free 127.0.0.1 port
with a tiny run, driven by real httpx clients, by many of them at once, and by a
real headless browser (Debian's Chromium through Selenium); its export read by
Drift and add_personas, the Drift-steered posts it then serves compared with
persomux's own Drift decoding; and last, killed with SIGKILL while clients vote,
its file read back through SQLite itself.

One server serves the whole module (starting one is most of the cost), with
Drift on and greedy feed posts, so a steered post can be checked token for token.

The browser test needs `chromium` and `chromium-driver` (`apt-get install -y
chromium chromium-driver`; the README's test command installs them when missing)
and the `selenium` of the test extra; without them it skips and says so. Alone:
`.venv/bin/python -m pytest tests/test_feed.py -k browser`.
"""

import json
import os
import re
import signal
import sqlite3
import threading
import time

import httpx
import pytest

from persomux import data as data_lib
from tests.test_launch import run as run_launch
from tests.test_serve import Server, make_run

METHOD_WORDS = ("real", "base", "soft_prompt", "random_codebook", "persona_mux", "drift", "persona")


@pytest.fixture(scope="module")
def feed_run(tmp_path_factory):
  return make_run(tmp_path_factory.mktemp("feed"), train=False, stage2=("persona_mux", "soft_prompt"))


def wait_until_written(url: str, reader: str | None = None, timeout: float = 180) -> None:
  """Waits until the pool (and, given a reader, their Drift posts) is written."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if reader is None:
      writing = httpx.get(f"{url}/feed/results", params={"format": "json"}, timeout=30).json()["pool"]["writing"]
    else:
      writing = httpx.get(f"{url}/feed/posts", params={"reader": reader, "n": 1}, timeout=30).json()["writing"]
    if writing == 0:
      return
    time.sleep(0.5)
  raise AssertionError(f"the feed's posts were not written within {timeout} s")


def feed_server(workdir, *flags) -> Server:
  # Compiled as the launch tests compile their launches (fast XLA:CPU settings, their cache).
  s = Server(workdir, "--slots=4", "--max_context=256", "--feed_contexts=6", "--feed_max_tokens=12",
             "--feed_in_flight=4", *flags, feed=True)
  try:
    wait_until_written(s.url)
  except BaseException:
    s.close()
    raise
  return s


@pytest.fixture(scope="module")
def server(feed_run):
  # Drift with a strong pull (a random tiny trunk's attribute prompts differ only a little).
  s = feed_server(feed_run[0], "--drift_streams=4", "--drift_beta=0.05", "--feed_temperature=0")
  yield s
  s.close()


def db(workdir) -> sqlite3.Connection:
  """The feed's database, opened with sqlite3 itself: the tests' own view of what was stored."""
  return sqlite3.connect(os.path.join(workdir, "feed.sqlite"), timeout=30)


def methods_of(workdir, ids) -> dict[str, str]:
  rows = db(workdir).execute(f"SELECT id, method FROM posts WHERE id IN ({','.join('?' * len(ids))})", list(ids))
  return dict(rows.fetchall())


def results(url) -> dict[str, dict]:
  body = httpx.get(f"{url}/feed/results", timeout=30).json()
  return {r["method"]: r for r in body["methods"]}


def delta(before: dict, after: dict) -> dict[str, dict[str, int]]:
  """Per method, how the reaction counts moved."""
  out = {}
  for m, row in after.items():
    d = {k: row[k] - before.get(m, {}).get(k, 0) for k in ("up", "down", "ai")}
    if any(d.values()):
      out[m] = d
  return out


def expected(workdir, votes: dict[str, str]) -> dict[str, dict[str, int]]:
  """Per method, the reaction counts of `votes` (post id -> final reaction)."""
  out: dict[str, dict[str, int]] = {}
  for pid, method in methods_of(workdir, votes).items():
    out.setdefault(method, {"up": 0, "down": 0, "ai": 0})[votes[pid]] += 1
  return out


def data_path(workdir) -> str:
  return json.load(open(os.path.join(workdir, "run.json")))["data"]["path"]


def test_the_pool_holds_each_context_real_and_per_method(server, feed_run):
  workdir, _ = feed_run
  conn = db(workdir)
  per = dict(conn.execute("SELECT method, COUNT(*) FROM posts GROUP BY method").fetchall())
  assert set(per) == {"real", "base", "soft_prompt", "persona_mux"}, per
  assert len(set(per.values())) == 1  # one post per method for every context
  split = json.load(open(os.path.join(workdir, "split.json")))
  records, _ = data_lib.load_records(data_path(workdir))
  real = {(r.cls, r.context, r.text) for r in records}
  rows = conn.execute("SELECT persona, context, text FROM posts WHERE method = 'real'").fetchall()
  assert all(tuple(r) in real for r in rows)
  assert {r[0] for r in rows} <= set(split["finetune"])  # the classes every method has a persona for
  # Generated posts answer the same contexts.
  contexts = {r[1] for r in rows}
  assert {r[0] for r in conn.execute("SELECT context FROM posts WHERE method != 'real'")} == contexts
  body = httpx.get(f"{server.url}/feed/results", timeout=30).json()
  assert body["pool"]["writing"] == 0 and body["pool"]["error"] is None


def test_posts_reactions_and_json_errors(server, feed_run):
  url, workdir = server.url, feed_run[0]
  r = httpx.get(f"{url}/feed/posts", params={"reader": "api_reader", "n": 8}, timeout=30)
  assert r.status_code == 200
  body = r.json()
  assert set(body) == {"reader", "posts", "writing"} and len(body["posts"]) == 8
  assert all(set(p) == {"id", "context", "text", "reaction"} and p["reaction"] is None for p in body["posts"])
  ids = [p["id"] for p in body["posts"]]
  again = httpx.get(f"{url}/feed/posts", params={"reader": "api_reader", "n": 8}, timeout=30).json()
  assert [p["id"] for p in again["posts"]] == ids  # a feed stays as it was shown
  page2 = httpx.get(f"{url}/feed/posts", params={"reader": "api_reader", "n": 4, "offset": 4}, timeout=30).json()
  assert [p["id"] for p in page2["posts"]] == ids[4:]

  before = results(url)
  react = lambda pid, reaction: httpx.post(f"{url}/feed/react", json={"reader": "api_reader", "post_id": pid,
                                                                       "reaction": reaction}, timeout=30)
  for pid, reaction in [(ids[0], "up"), (ids[1], "down"), (ids[2], "ai"), (ids[1], "up"), (ids[3], "ai"),
                        (ids[3], "none")]:
    r = react(pid, reaction)
    assert r.status_code == 200 and r.json() == {"post_id": pid, "reaction": None if reaction == "none" else
                                                 reaction}
  shown = httpx.get(f"{url}/feed/posts", params={"reader": "api_reader", "n": 8}, timeout=30).json()["posts"]
  assert [p["reaction"] for p in shown[:4]] == ["up", "up", "ai", None]
  assert delta(before, results(url)) == expected(workdir, {ids[0]: "up", ids[1]: "up", ids[2]: "ai"})

  cases = [
      (react("no-such-post", "up"), 404, "no-such-post"),
      (react(ids[0], "love"), 422, "reaction"),
      (httpx.post(f"{url}/feed/react", json={"reader": "../etc", "post_id": ids[0], "reaction": "up"}), 422,
       "reader"),
      (httpx.post(f"{url}/feed/react", json={"reader": "x", "post_id": ids[0]}), 422, "reaction"),
      (httpx.post(f"{url}/feed/react", content=b"{nope", headers={"content-type": "application/json"}), 422, ""),
      (httpx.get(f"{url}/feed/posts", params={"reader": "a b"}), 422, "reader"),
      (httpx.get(f"{url}/feed/posts"), 422, "reader"),
      (httpx.get(f"{url}/feed/posts", params={"reader": "x", "n": 0}), 422, "n"),
      (httpx.get(f"{url}/feed/static/../app.py"), 404, ""),
  ]
  for resp, status, word in cases:
    assert resp.status_code == status, (resp.request.url, resp.text)
    assert word in resp.json()["error"]["message"], resp.text
  assert server.health()["status"] == "ok"
  # The HTML view counts the same.
  page = httpx.get(f"{url}/feed/results", headers={"accept": "text/html"}, timeout=30)
  assert page.headers["content-type"].startswith("text/html") and "<table" in page.text
  png = httpx.get(f"{url}/feed/results.png", timeout=60)
  assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_response_a_reader_sees_names_a_method_or_persona(server, feed_run):
  url, workdir = server.url, feed_run[0]
  split = json.load(open(os.path.join(workdir, "split.json")))
  secret = [*METHOD_WORDS, *split["pretrain"], *split["finetune"], "tiny-chat"]
  pattern = re.compile(r"\b(" + "|".join(map(re.escape, secret)) + r")\b", re.IGNORECASE)
  seen = []
  for path in ("/feed", "/feed/static/feed.js", "/feed/static/feed.css"):
    r = httpx.get(url + path, timeout=30)
    assert r.status_code == 200
    seen.append((path, r.text))
  total = db(workdir).execute("SELECT COUNT(*) FROM posts").fetchone()[0]
  body = httpx.get(f"{url}/feed/posts", params={"reader": "blind_reader", "n": total}, timeout=30).json()
  posts = body["posts"]
  assert len(posts) > 10
  ids = [p["id"] for p in posts]
  assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids) and len(set(ids)) == len(ids)
  # What a reader gets besides each post's context and text (data, not metadata).
  seen.append(("posts", json.dumps({**body, "posts": [{k: v for k, v in p.items() if k not in ("context", "text")}
                                                      for p in posts]})))
  for p in posts[:6]:
    r = httpx.post(f"{url}/feed/react", json={"reader": "blind_reader", "post_id": p["id"], "reaction": "up"})
    seen.append(("react", r.text))
  seen.append(("404", httpx.post(f"{url}/feed/react", json={"reader": "blind_reader", "post_id": "zz",
                                                            "reaction": "up"}).text))
  for where, text in seen:
    assert not pattern.search(text), (where, pattern.search(text).group(0))
  # The posts' order and ids say nothing either: ids sorted do not group methods.
  methods = methods_of(workdir, ids)
  assert len({methods[i] for i in sorted(ids)[:len(ids) // 2]}) > 1


def test_many_clients_voting_at_once_lose_no_vote(server, feed_run):
  url, workdir = server.url, feed_run[0]
  readers = [f"crowd_{i:02d}" for i in range(12)]
  feeds = {r: [p["id"] for p in httpx.get(f"{url}/feed/posts", params={"reader": r, "n": 10},
                                          timeout=30).json()["posts"]] for r in readers}
  before = results(url)
  final: dict[tuple[str, str], str] = {}
  for k, r in enumerate(readers):
    for j, pid in enumerate(feeds[r]):
      final[(r, pid)] = ("up", "down", "ai")[(k + j) % 3]
  barrier = threading.Barrier(len(readers))
  failures = []

  def vote(reader):
    with httpx.Client(base_url=url, timeout=60) as client:
      barrier.wait()
      for j, pid in enumerate(feeds[reader]):
        for reaction in (("up", "down", "ai")[(j + 1) % 3], final[(reader, pid)]):  # a first vote, then a change
          r = client.post("/feed/react", json={"reader": reader, "post_id": pid, "reaction": reaction})
          if r.status_code != 200:
            failures.append((reader, pid, r.status_code, r.text))

  threads = [threading.Thread(target=vote, args=(r,)) for r in readers]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert not failures, failures[:3]
  stored = db(workdir).execute("SELECT reader, post_id, reaction FROM reactions WHERE reader LIKE 'crowd_%'")
  assert {(r, p): x for r, p, x in stored} == final
  # Several readers share posts: each (reader, post) counts once.
  counts: dict[str, dict[str, int]] = {}
  methods = methods_of(workdir, {pid for _, pid in final})
  for (r, pid), reaction in final.items():
    counts.setdefault(methods[pid], {"up": 0, "down": 0, "ai": 0})[reaction] += 1
  assert delta(before, results(url)) == counts


# --- the page in a real browser ---------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--window-size=390,844")  # a phone's screen


def _no_browser() -> str | None:
  for path in (CHROMIUM, CHROMEDRIVER):
    if not os.path.exists(path):
      return (f"{path} is missing: apt-get install -y chromium chromium-driver, then .venv/bin/python -m pytest "
              "tests/test_feed.py -k browser")
  try:
    import selenium  # noqa: F401
  except ImportError:
    return "selenium is not installed: .venv/bin/pip install -e '.[test]'"
  return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
  why = _no_browser()
  if why:
    pytest.skip(why)
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service

  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # a given driver: nothing downloaded
  driver.set_page_load_timeout(60)
  yield driver
  driver.quit()


def _wait(driver, condition, timeout=60):
  from selenium.webdriver.support.ui import WebDriverWait

  return WebDriverWait(driver, timeout).until(condition)


def _articles(driver):
  return driver.find_elements("css selector", "#posts article.post")


def _pressed(article) -> str | None:
  on = [b.get_attribute("data-reaction") for b in article.find_elements("css selector", "button[data-reaction]")
        if b.get_attribute("aria-pressed") == "true"]
  assert len(on) <= 1
  return on[0] if on else None


def test_browser_signs_in_reacts_reloads_and_sees_results(browser, server, feed_run):
  from persomux.feed.results import LABELS

  url, workdir, d = server.url, feed_run[0], browser
  css = lambda q: d.find_element("css selector", q)
  d.get(f"{url}/feed")
  _wait(d, lambda d: css("#signin").is_displayed())
  assert "127.0.0.1 (this machine only)" in css(".note").text
  css("#name").send_keys("browser_reader")
  css("#signin button[type=submit]").click()
  _wait(d, lambda d: len(_articles(d)) >= 5)
  assert css("#who").text == "Signed in as browser_reader"
  assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scroll
  before = results(url)
  articles = _articles(d)[:5]
  ids = [a.get_attribute("data-id") for a in articles]
  plan = dict(zip(ids, ["up", "down", "ai", "up", "down"]))
  for a, pid in zip(articles, ids):
    a.find_element("css selector", f"button[data-reaction={plan[pid]}]").click()
    _wait(d, lambda d, a=a, pid=pid: _pressed(a) == plan[pid])
  # Change one vote, and take one back by pressing it again.
  articles[1].find_element("css selector", "button[data-reaction=up]").click()
  _wait(d, lambda d: _pressed(articles[1]) == "up")
  articles[4].find_element("css selector", "button[data-reaction=down]").click()
  _wait(d, lambda d: _pressed(articles[4]) is None)
  plan[ids[1]] = "up"
  del plan[ids[4]]

  d.refresh()
  _wait(d, lambda d: len(_articles(d)) >= 5)
  assert css("#who").text == "Signed in as browser_reader"  # still signed in
  kept = {a.get_attribute("data-id"): _pressed(a) for a in _articles(d)}
  assert [kept[i] for i in ids] == [plan.get(i) for i in ids]
  api = httpx.get(f"{url}/feed/posts", params={"reader": "browser_reader", "n": 5}, timeout=30).json()["posts"]
  assert {p["id"]: p["reaction"] for p in api} == {i: plan.get(i) for i in ids}

  # The results page counts them, per method (which the test reads from the database).
  assert delta(before, results(url)) == expected(workdir, plan)
  d.get(f"{url}/feed/results")
  _wait(d, lambda d: d.find_elements("css selector", "table.results tbody tr"))
  shown = {}
  for tr in d.find_elements("css selector", "table.results tbody tr"):
    cells = [td.text for td in tr.find_elements("tag name", "td")]
    shown[cells[0]] = dict(zip(("up", "down", "ai"), map(int, cells[3:6])))
  for method, row in results(url).items():
    assert shown[LABELS[method]] == {k: row[k] for k in ("up", "down", "ai")}
  assert d.execute_script("const i = document.querySelector('img.plot'); return i.complete && i.naturalWidth > 0")


# --- closing the loop: export, Drift weights, personas, steered posts -----------------------

ATTRIBUTES = {"Formal": "You are an AI assistant with a formal tone.", "Humor": "You are a humorous AI assistant.",
              "Concise": "You are an AI assistant with a concise response rather than verbosity."}


def test_export_to_drift_and_personas_then_steered_posts(server, feed_run, tmp_path):
  """Two readers vote; their export is what Drift (`drift.load_pairs`, `drift.fit`, as
  `launch/drift.py fit` runs them, each reader's pairs scored in one batch) and
  `stages.add_personas` take; with their weights stored, the server writes each of them
  posts steered by their own weights, equal to persomux's Drift decoding, that no one
  else sees."""
  import persomux
  from persomux import drift, sampling, stages
  from persomux.bank import PersonaBank

  url = server.url
  workdir, model_dir = feed_run
  total = db(workdir).execute("SELECT COUNT(*) FROM posts").fetchone()[0]
  for k, reader in enumerate(["loop_a", "loop_b"]):
    posts = httpx.get(f"{url}/feed/posts", params={"reader": reader, "n": total}, timeout=30).json()["posts"]
    by_context: dict[str, list] = {}
    for p in posts:
      by_context.setdefault(p["context"], []).append(p["id"])
    for ids in by_context.values():
      for j, pid in enumerate(ids):
        reaction = "up" if (j + k) % 2 == 0 else "down"
        assert httpx.post(f"{url}/feed/react", json={"reader": reader, "post_id": pid,
                                                    "reaction": reaction}).status_code == 200
  out = tmp_path / "export"
  r = run_launch("feed_export.py", f"--workdir={workdir}", f"--out={out}")
  assert "launch/drift.py fit" in r.stdout and "launch/add_personas.py" in r.stdout

  users = drift.by_user(drift.load_pairs(str(out / "pairs.jsonl")))
  assert {"loop_a", "loop_b"} <= set(users)
  trunk, tok = persomux.load_model(model_dir)
  weights = {}
  for u in ("loop_a", "loop_b"):
    assert all(p.prompt and p.chosen != p.rejected for p in users[u])
    weights[u] = drift.fit(trunk, tok, users[u], ATTRIBUTES, k=3, model_name=model_dir, user=u, batch_size=256)
    weights[u].save(os.path.join(workdir, "drift", f"{u}.json"))
  # With their weights stored, each reader's next visit has the server write them their own
  # steered posts; meanwhile this process does the rest of the loop.
  for reader in ("loop_a", "loop_b"):
    httpx.get(f"{url}/feed/posts", params={"reader": reader, "n": 1}, timeout=30)

  report = run_launch("feed_report.py", f"--workdir={workdir}", f"--out={tmp_path / 'report.png'}")
  assert "like rate" in report.stdout and "Persona-Mux" in report.stdout
  assert json.load(open(tmp_path / "report.json"))["reactions"] == results_total(url)
  assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # The liked posts become personas named after their readers.
  cfg = stages.load_run(workdir)
  cfg["finetune"].update(steps=2, checkpoint_every=2, eval_every=2)
  liked = [r for r in data_lib.load_records(str(out / "records.jsonl"))[0] if r.cls in ("loop_a", "loop_b")]
  result = stages.add_personas(cfg, workdir, trunk, tok, liked, job="feed_readers", progress=False)
  assert set(result["per_persona"]) == {"loop_a", "loop_b"}
  assert PersonaBank.load(workdir)["loop_a"].job == "feed_readers"

  # What a steered post of loop_a's must be: persomux's Drift decoding of its context with
  # the context's persona, and not the unsteered one.
  conn = db(workdir)
  persona, context = conn.execute("SELECT persona, context FROM posts WHERE method = 'real' ORDER BY id").fetchone()
  bank = PersonaBank.load(workdir)
  pre, suf = stages.formatter_for(tok, cfg).prompt_pieces(bank[persona].text, context)
  row, soft = [(pre + suf, len(pre))], bank.soft_prompts([persona])
  ref = sampling.generate_rows(trunk, tok, row, max_new_tokens=12, soft_prompts=soft,
                               logit_streams=drift.streams(trunk, tok, [weights["loop_a"]], [context], beta=0.05))[0]

  for reader in ("loop_a", "loop_b"):
    wait_until_written(url, reader)
  steered = conn.execute("SELECT id, reader, persona, context, text FROM posts WHERE method = 'drift'").fetchall()
  contexts = conn.execute("SELECT COUNT(*) FROM posts WHERE method = 'real'").fetchone()[0]
  assert sorted(r[1] for r in steered) == ["loop_a"] * contexts + ["loop_b"] * contexts
  grown = httpx.get(f"{url}/feed/posts", params={"reader": "loop_a", "n": 2 * total}, timeout=30).json()["posts"]
  got = methods_of(workdir, [p["id"] for p in grown])
  owners = {r[0]: r[1] for r in steered}
  assert "drift" in got.values() and all(owners[i] == "loop_a" for i, m in got.items() if m == "drift")
  other = httpx.get(f"{url}/feed/posts", params={"reader": "no_weights", "n": 2 * total}, timeout=30).json()["posts"]
  assert "drift" not in methods_of(workdir, [p["id"] for p in other]).values()
  text = {(r[1], r[2], r[3]): r[4] for r in steered}[("loop_a", persona, context)]
  # The pool's Persona-Mux post on that context is the same greedy decoding without the pull.
  plain = conn.execute("SELECT text FROM posts WHERE method = 'persona_mux' AND persona = ? AND context = ?",
                       (persona, context)).fetchone()[0]
  assert text == ref.strip() and text != plain


def results_total(url) -> int:
  return httpx.get(f"{url}/feed/results", timeout=30).json()["reactions"]


# --- last: the module's server killed mid-write ---------------------------------------------


def test_a_server_killed_mid_write_keeps_every_acknowledged_vote(server, feed_run):
  """Runs last: it kills the module's server with SIGKILL while six clients vote."""
  from persomux.feed.store import Store

  url, workdir = server.url, feed_run[0]
  readers = [f"kill_{i}" for i in range(6)]
  feeds = {r: [p["id"] for p in httpx.get(f"{url}/feed/posts", params={"reader": r, "n": 30},
                                          timeout=30).json()["posts"]] for r in readers}
  acked: dict[tuple[str, str], str] = {}  # the last vote the server acknowledged
  sent: dict[tuple[str, str], str] = {}  # a vote on its way, not acknowledged (yet)
  refused = []
  lock = threading.Lock()

  def vote(reader):
    with httpx.Client(base_url=url, timeout=10) as client:
      for j, pid in enumerate(feeds[reader] * 1000):  # round after round of changed votes, until the kill
        reaction = ("up", "down", "ai")[(j + len(reader)) % 3]
        with lock:
          sent[(reader, pid)] = reaction
        try:
          r = client.post("/feed/react", json={"reader": reader, "post_id": pid, "reaction": reaction})
        except httpx.HTTPError:
          return  # the server is gone
        if r.status_code != 200:
          refused.append(r.text)
          return
        with lock:
          acked[(reader, pid)] = sent.pop((reader, pid))

  threads = [threading.Thread(target=vote, args=(r,)) for r in readers]
  for t in threads:
    t.start()
  deadline = time.time() + 60
  while len(acked) < 60 and time.time() < deadline:
    time.sleep(0.005)
  server.proc.send_signal(signal.SIGKILL)  # the clients are still sending
  server.proc.wait(timeout=30)
  for t in threads:
    t.join(timeout=30)
  assert len(acked) >= 60 and not refused, refused[:3]
  conn = db(workdir)
  assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
  stored = {(r, p): x for r, p, x in conn.execute("SELECT reader, post_id, reaction FROM reactions "
                                                  "WHERE reader LIKE 'kill_%'")}
  for key, reaction in acked.items():
    # The last acknowledged vote, unless one sent after it (never acknowledged) replaced it.
    assert stored.get(key) in {reaction, sent.get(key)}, (key, reaction, stored.get(key), sent.get(key))
  assert set(stored) <= set(acked) | set(sent)
  conn.close()
  # Opened again (as a restarted server does), the file needs no migration and shows the votes.
  store = Store(os.path.join(workdir, "feed.sqlite"))
  for reader in readers:
    shown = store.feed(reader, 100, extend=False)
    assert {p["id"]: p["reaction"] for p in shown if p["reaction"]} == \
        {p: x for (r, p), x in stored.items() if r == reader}
