r"""Serves every persona of a run from one base model: an OpenAI-compatible HTTP server.

  python launch/serve.py --workdir=runs/demo [--host=127.0.0.1] [--port=8000]

Then, with the `openai` client (any OpenAI-compatible client works):

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
  model = client.models.list().data[0].id
  reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi!"}],
                                         extra_body={"persona": "persona_0003", "bias_scale": 1.0})

A request's `drift` field names a user whose Drift weights are stored as
WORKDIR/drift/USER.json (launch/drift.py fit --out=...); their replies are
steered toward that user's preferences. Requests for different personas share decode steps (continuous batching over
--slots rows). `POST /v1/personas` adds personas while serving (an
add_personas job in the background); they join the bank when it finishes.
Endpoints and errors: `persomux/serving/app.py`. The server binds to
localhost unless --host says otherwise; it has no authentication.

The preference feed is at http://127.0.0.1:8000/feed (`persomux/feed/`): readers
sign in with a name and react (upvote, downvote, mark as AI) to real posts from
the run's data mixed with posts each --feed_methods method wrote for the same
contexts (generated in the background and kept, with the reactions, in
WORKDIR/feed.sqlite). Results: /feed/results and launch/feed_report.py.
"""

import os

if __package__:  # imported as launch.serve: installed, python -m, or a console entry point
  from launch import common  # noqa: F401
else:  # python launch/serve.py from a checkout (sys.path[0] is launch/)
  import common  # noqa: F401
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A run directory (stage 1 done; its personas form the bank).", required=True)
flags.DEFINE_string("host", "127.0.0.1", "Address to bind. The default serves this machine only; 0.0.0.0 "
                    "exposes the server, which has no authentication, to the network.")
flags.DEFINE_integer("port", 8000, "Port to bind.")
flags.DEFINE_integer("slots", 8, "Requests decoded together (rows of KV cache).")
flags.DEFINE_integer("max_context", 1024, "Most positions per request: prompt, soft tokens and reply.")
flags.DEFINE_integer("queue_size", 64, "Requests that may wait for a slot; beyond it a request gets 429.")
flags.DEFINE_integer("max_tokens", 256, "Reply length when a request gives no max_tokens.")
flags.DEFINE_string("model_id", None, "The model id clients pass (default: the run's model name).")
flags.DEFINE_integer("drift_streams", 0, "Drift: small-LM streams per slot (the base + up to this - 1 attributes "
                     "of a user's weights), e.g. 8; 0 (the default) turns Drift off. The trunk is its own "
                     "small LM; each slot then holds this many more rows of KV cache.")
flags.DEFINE_float("drift_beta", 0.5, "Drift strength: logits + (1/beta) * the attribute streams' pull.")
flags.DEFINE_bool("allow_training", True, "Let POST /v1/personas run add_personas jobs on this server.")
flags.DEFINE_bool("feed", True, "Serve the preference feed at /feed (posts generated in the background).")
flags.DEFINE_list("feed_methods", ["base", "soft_prompt", "persona_mux", "drift"],
                  "Methods that write feed posts: base, soft_prompt, random_codebook, persona_mux, drift (Drift "
                  "needs --drift_streams and a reader's weights in WORKDIR/drift/READER.json).")
flags.DEFINE_float("feed_share", 0.5, "Share of generated posts in each reader's feed.")
flags.DEFINE_integer("feed_contexts", 32, "Contexts of the run's data the feed shows (each: a real post and one "
                     "per method).")
flags.DEFINE_integer("feed_max_tokens", 48, "Length of a generated feed post.")
flags.DEFINE_float("feed_temperature", 1.0, "Sampling temperature of feed posts.")
flags.DEFINE_float("feed_top_p", 0.95, "Top-p of feed posts.")
flags.DEFINE_integer("feed_in_flight", 0, "Feed posts generated at once (0: half the slots), so chat requests "
                     "keep the rest.")
flags.DEFINE_bool("feed_results", True, "Show per-method results at /feed/results (a reader watching them while "
                  "voting could tell a post's method; --nofeed_results keeps them to launch/feed_report.py).")


def main(argv):
  del argv
  import uvicorn

  from persomux import stages
  from persomux.bank import PersonaBank
  from persomux.feed import web as feed_web
  from persomux.serving.app import Service, create_app
  from persomux.serving.engine import Engine

  try:
    run = stages.load_run(FLAGS.workdir)
    bank = PersonaBank.load(FLAGS.workdir)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from e
  common.setup(run)
  trunk, tokenizer = stages.load_trunk(run)
  engine = Engine(trunk, tokenizer, slots=FLAGS.slots, max_context=FLAGS.max_context, queue_size=FLAGS.queue_size,
                  drift_streams=FLAGS.drift_streams, drift_beta=FLAGS.drift_beta).start()
  model_id = FLAGS.model_id or os.path.basename(os.path.normpath(run["model_dir"]))
  service = None

  def add_personas(records, job, replace):
    out = stages.add_personas(run, FLAGS.workdir, trunk, tokenizer, records, job=job, replace=replace,
                              source=f"POST /v1/personas (job {job})", progress=False)
    service.set_bank(PersonaBank.load(FLAGS.workdir))
    return {k: out[k] for k in ("initial_test_loss", "test_loss", "per_persona")}

  service = Service(engine, bank, stages.formatter_for(tokenizer, run), model_id, max_tokens_default=FLAGS.max_tokens,
                    add_personas=add_personas if FLAGS.allow_training else None,
                    drift_dir=os.path.join(FLAGS.workdir, "drift"))
  local = FLAGS.host in ("127.0.0.1", "localhost", "::1")
  where = "this machine only" if local else "THE NETWORK (no authentication)"
  api = create_app(service)
  feed_web.add_routes(api, make_feed(run, service, f"{FLAGS.host} ({where})") if FLAGS.feed else
                      "started with --nofeed")
  print(f"serving {len(bank)} personas of {FLAGS.workdir} as model {model_id!r} on "
        f"http://{FLAGS.host}:{FLAGS.port}/v1 ({where}); {FLAGS.slots} slots", flush=True)
  if FLAGS.feed:
    print(f"the feed: http://{FLAGS.host}:{FLAGS.port}/feed (sign-in by name, no passwords)", flush=True)
  try:
    uvicorn.run(api, host=FLAGS.host, port=FLAGS.port, log_level="warning")
  finally:
    engine.stop()


def make_feed(run, service, where: str):
  """The feed over this run, or a string saying why there is none (the chat API still serves)."""
  from persomux import data as data_lib
  from persomux.feed import pool, store

  try:
    return pool.Feed(FLAGS.workdir, run, service, methods=FLAGS.feed_methods, share=FLAGS.feed_share,
                     contexts=FLAGS.feed_contexts, max_tokens=FLAGS.feed_max_tokens,
                     temperature=FLAGS.feed_temperature, top_p=FLAGS.feed_top_p,
                     in_flight=FLAGS.feed_in_flight or max(1, FLAGS.slots // 2), where=where,
                     public_results=FLAGS.feed_results).start()
  except data_lib.DataError as e:  # data the feed cannot use: the chat API serves on
    print(f"the feed is off: {e}", flush=True)
    return str(e)
  except (ValueError, store.StoreError) as e:  # a bad flag or feed database
    raise app.UsageError(str(e)) from e


def run():
  """Console entry point."""
  common.run(main)


if __name__ == "__main__":
  run()
