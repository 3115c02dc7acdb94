r"""Talk to a persona: generate with its soft prompt from a trained workdir.

  python launch/generate.py --workdir=runs/demo --persona=persona_0007 --bias_scale=0.5 --prompts=prompts.txt
  echo "Tell me about the harbor." | python launch/generate.py --workdir=runs/demo --persona=persona_0007 --prompts=-

Each line of --prompts is one prompt (the context the persona answers). The
persona's text description and soft tokens are placed exactly as in
training. Prints one continuation per line, or writes JSONL with --output.
"""

import json
import sys

if __package__:  # imported as launch.generate: installed, python -m, or a console entry point
  from launch import common  # noqa: F401
else:  # python launch/generate.py from a checkout (sys.path[0] is launch/)
  import common  # noqa: F401
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A run directory with a trained prompt.", required=True)
flags.DEFINE_string("persona", None, "Class name of the persona.", required=True)
flags.DEFINE_string("prompts", "-", "File with one prompt per line, or - for stdin.")
flags.DEFINE_enum("method", "persona_mux", ["persona_mux", "random_codebook", "soft_prompt"],
                  "Which trained prompt to use.")
flags.DEFINE_float("bias_scale", 1.0, "Scale of the bias tokens: 1 full, 0.5 half, 0 removes them.")
flags.DEFINE_integer("max_new_tokens", 64, "Most tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens.")
flags.DEFINE_float("top_p", None, "Nucleus sampling mass.")
flags.DEFINE_string("drift", None, "Drift weights (launch/drift.py fit) that steer every reply toward a "
                    "listener's preferences; the small LM is the one recorded in them unless --drift_model.")
flags.DEFINE_string("drift_model", None, "The small LM for --drift (must share the trunk's tokenizer); "
                    "default: the weights' model, or the trunk itself when that is the same.")
flags.DEFINE_float("drift_beta", 0.5, "Drift strength: logits + (1/beta) * the attribute streams' pull.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("batch_size", 16, "Prompts per generation batch.")
flags.DEFINE_string("output", None, "Write JSONL here instead of printing.")


def main(argv):
  del argv
  from persomux import sampling, stages

  run = common.run_config(None, FLAGS.workdir)
  mesh = common.setup(run)
  trunk, tokenizer = stages.load_trunk(run, mesh)
  try:
    module, cid, _ = stages.find_persona(FLAGS.workdir, FLAGS.persona, FLAGS.method, trunk.config.d_model)
  except (KeyError, FileNotFoundError) as e:
    raise app.UsageError(str(e).strip('"')) from e
  persona_text = stages.persona_texts(FLAGS.workdir).get(FLAGS.persona)
  weights = small = small_tok = None
  if FLAGS.drift:
    from persomux import drift
    from persomux.models.params import load_model

    try:
      weights = drift.DriftWeights.load(FLAGS.drift)
    except (OSError, ValueError) as e:
      raise app.UsageError(f"--drift: {e}") from e
    name = FLAGS.drift_model or weights.model
    if not name or name == run.model_dir:
      small, small_tok = trunk, tokenizer
    else:
      small, small_tok = load_model(name, dtype=run.dtype or None)
    if small.config.vocab_size != trunk.config.vocab_size:
      raise app.UsageError(f"--drift: the small LM {name!r} has a vocabulary of {small.config.vocab_size}, the "
                           f"trunk {trunk.config.vocab_size}; Drift needs a shared tokenizer")
  fmt = stages.formatter_for(tokenizer, run)
  src = sys.stdin if FLAGS.prompts == "-" else open(FLAGS.prompts)
  lines = [l.rstrip("\n") for l in src if l.strip()]
  if not lines:
    raise app.UsageError(f"--prompts={FLAGS.prompts}: no prompts (one per line expected)")
  out = open(FLAGS.output, "w") if FLAGS.output else None
  for start in range(0, len(lines), FLAGS.batch_size):
    chunk = lines[start:start + FLAGS.batch_size]
    rows = []
    for line in chunk:
      pre, suf = fmt.prompt_pieces(persona_text, line)
      rows.append((pre + suf, len(pre)))
    streams = None
    if weights is not None:
      streams = drift.streams(small, small_tok, [weights] * len(chunk), chunk, beta=FLAGS.drift_beta)
    texts = sampling.generate_rows(
        trunk, tokenizer, rows, max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
        top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed + start,
        soft_prompts=sampling.SoftPrompts(module, [cid] * len(rows), FLAGS.bias_scale), logit_streams=streams)
    for line, text in zip(chunk, texts):
      if out:
        out.write(json.dumps({"persona": FLAGS.persona, "bias_scale": FLAGS.bias_scale, "prompt": line,
                              "generation": text}) + "\n")
      else:
        print(text.replace("\n", " "))
  if out:
    out.close()


def run():
  """Console entry point."""
  common.run(main)


if __name__ == "__main__":
  run()
