// The feed page: sign in with a name, read posts, react. Talks only to this server's JSON API.
(function () {
  "use strict";
  const PAGE = parseInt(document.body.dataset.page, 10) || 20;
  const READER_KEY = "persomux-feed-reader";
  const LABELS = { up: "Upvote", down: "Downvote", ai: "Mark as AI" };
  const $ = (id) => document.getElementById(id);
  let reader = null;
  let shownIds = new Set();
  let timer = null;

  async function api(path, options) {
    const r = await fetch(path, options);
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error((body.error && body.error.message) || r.status + " " + r.statusText);
    return body;
  }

  function setStatus(text, isError) {
    $("status").textContent = text;
    $("status").className = isError ? "error" : "";
  }

  function press(article, reaction) {
    article.dataset.reaction = reaction || "";
    for (const b of article.querySelectorAll("button[data-reaction]")) {
      b.setAttribute("aria-pressed", String(b.dataset.reaction === reaction));
    }
  }

  async function react(article, reaction) {
    const next = article.dataset.reaction === reaction ? "none" : reaction;  // pressing it again takes it back
    try {
      const body = await api("/feed/react", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ reader: reader, post_id: article.dataset.id, reaction: next }),
      });
      press(article, body.reaction);
      setStatus("");
    } catch (e) {
      setStatus("Could not save that: " + e.message, true);
    }
  }

  function render(post) {
    const article = document.createElement("article");
    article.className = "post";
    article.dataset.id = post.id;
    const context = document.createElement("p");
    context.className = "context";
    context.textContent = post.context;
    const text = document.createElement("p");
    text.className = "text";
    text.textContent = post.text;
    const actions = document.createElement("div");
    actions.className = "actions";
    for (const reaction of ["up", "down", "ai"]) {
      const b = document.createElement("button");
      b.type = "button";
      b.dataset.reaction = reaction;
      b.textContent = LABELS[reaction];
      b.addEventListener("click", () => react(article, reaction));
      actions.append(b);
    }
    article.append(context, text, actions);
    press(article, post.reaction);
    return article;
  }

  function savedCount() {
    return parseInt(localStorage.getItem(READER_KEY + ":" + reader + ":shown"), 10) || 0;
  }

  async function load(offset, n) {
    clearTimeout(timer);
    let body;
    try {
      body = await api("/feed/posts?reader=" + encodeURIComponent(reader) + "&n=" + n + "&offset=" + offset);
    } catch (e) {
      setStatus("Could not load the feed: " + e.message, true);
      return;
    }
    for (const post of body.posts) {
      if (shownIds.has(post.id)) continue;
      shownIds.add(post.id);
      $("posts").append(render(post));
    }
    localStorage.setItem(READER_KEY + ":" + reader + ":shown", String(shownIds.size));
    if (body.posts.length < n && body.writing > 0) {
      setStatus(body.writing + " posts are still being written; more appear here by themselves.");
      timer = setTimeout(() => load(shownIds.size, PAGE), 3000);
    } else if (body.posts.length < n) {
      setStatus(shownIds.size ? "That is every post for now." : "No posts yet.");
    } else {
      setStatus("");
    }
    $("more").hidden = body.posts.length < n;
  }

  function show() {
    $("signin").hidden = reader !== null;
    $("feed").hidden = reader === null;
    $("signout").hidden = reader === null;
    $("who").textContent = reader ? "Signed in as " + reader : "";
    $("posts").replaceChildren();
    shownIds = new Set();
    if (reader) load(0, Math.max(PAGE, savedCount()));
  }

  $("signin").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("name").value.trim();
    if (!$("name").checkValidity() || !name) return;
    reader = name;
    localStorage.setItem(READER_KEY, reader);
    show();
  });
  $("signout").addEventListener("click", () => {
    clearTimeout(timer);
    localStorage.removeItem(READER_KEY);
    reader = null;
    show();
  });
  $("more").addEventListener("click", () => load(shownIds.size, PAGE));

  reader = localStorage.getItem(READER_KEY);
  show();
})();
