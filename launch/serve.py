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


def main(argv):
  del argv
  import uvicorn

  from persomux import stages
  from persomux.bank import PersonaBank
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
  where = "this machine only" if FLAGS.host in ("127.0.0.1", "localhost", "::1") else \
      "THE NETWORK (no authentication)"
  print(f"serving {len(bank)} personas of {FLAGS.workdir} as model {model_id!r} on "
        f"http://{FLAGS.host}:{FLAGS.port}/v1 ({where}); {FLAGS.slots} slots", flush=True)
  try:
    uvicorn.run(create_app(service), host=FLAGS.host, port=FLAGS.port, log_level="warning")
  finally:
    engine.stop()


def run():
  """Console entry point."""
  common.run(main)


if __name__ == "__main__":
  run()
