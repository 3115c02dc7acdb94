r"""Drift weights from a user's preference pairs, and how well they predict held-out pairs.

  python launch/drift.py fit --pairs=pairs.jsonl --model=smollm2-135m-instruct --out=weights.json
  python launch/drift.py predict --weights=weights.json --pairs=heldout.jsonl [--model=...]

Pairs are JSONL: `prompt`, `chosen`, `rejected` and an optional `user`. With
several users in one file, `fit` writes one weights file per user into the
directory --out (OUT/USER.json) and `predict --weights=DIR` scores each user
with their own. `fit` prints the kept attributes and their weights; `predict`
prints per-user accuracy and, last, `drift accuracy = X.XXX` (the share of
pairs whose chosen response is predicted). --model is any `load_model` path or
shipped name (it must share the generator's tokenizer); `predict` defaults to
the model recorded in the weights. Attributes default to the Drift paper's 41
(`persomux.drift.DEFAULT_ATTRIBUTES`); --attributes=FILE.json gives others as
{"name": "system prompt", ...}.
"""

import json
import os

if __package__:  # imported as launch.drift: installed, python -m, or a console entry point
  from launch import common  # noqa: F401
else:  # python launch/drift.py from a checkout (sys.path[0] is launch/)
  import common  # noqa: F401
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("pairs", None, "JSONL preference pairs (prompt, chosen, rejected, optional user).")
flags.DEFINE_string("model", None, "fit: the small LM that scores (a load_model path or shipped name); "
                    "predict: default, the one recorded in the weights.")
flags.DEFINE_string("out", None, "fit: weights.json (one user) or a directory (several users).")
flags.DEFINE_string("weights", None, "predict: a weights.json, or a directory of USER.json.")
flags.DEFINE_string("attributes", None, "fit: JSON {name: system prompt}; default: the paper's 41.")
flags.DEFINE_integer("k", 7, "fit: attributes kept.")
flags.DEFINE_integer("batch_size", 16, "Rows scored per batch.")
flags.DEFINE_string("dtype", "", "Model dtype (default: the checkpoint's own).")


def _user_file(directory: str, user) -> str:
  return os.path.join(directory, f"{user or 'default'}.json")


def main(argv):
  from persomux import drift
  from persomux.models.params import load_model

  if len(argv) != 2 or argv[1] not in ("fit", "predict"):
    raise app.UsageError("expected a command: fit or predict (launch/drift.py fit --pairs=... --model=... --out=...)")
  command = argv[1]
  if not FLAGS.pairs:
    raise app.UsageError("--pairs is required")
  try:
    users = drift.by_user(drift.load_pairs(FLAGS.pairs))
  except drift.PairsError as e:
    raise app.UsageError(str(e)) from e
  if command == "fit":
    if not FLAGS.model or not FLAGS.out:
      raise app.UsageError("fit needs --model and --out")
    attributes = None
    if FLAGS.attributes:
      with open(FLAGS.attributes) as f:
        attributes = json.load(f)
      if not isinstance(attributes, dict) or not all(isinstance(v, str) for v in attributes.values()):
        raise app.UsageError(f"--attributes={FLAGS.attributes}: expected a JSON object {{name: system prompt}}")
    model, tok = load_model(FLAGS.model, dtype=FLAGS.dtype or None)
    for user, pairs in users.items():
      w = drift.fit(model, tok, pairs, attributes, k=FLAGS.k, model_name=FLAGS.model, user=user,
                    batch_size=FLAGS.batch_size, progress=f"fit {user or 'pairs'}")
      path = FLAGS.out if len(users) == 1 else _user_file(FLAGS.out, user)
      w.save(path)
      top = ", ".join(f"{n} {p:+.3f}" for n, p in sorted(w.top().items(), key=lambda x: -abs(x[1])))
      print(f"{user or 'pairs'}: {len(pairs)} pairs -> {path}: {top}")
    return
  if not FLAGS.weights:
    raise app.UsageError("predict needs --weights")
  try:
    if os.path.isdir(FLAGS.weights):
      weights = {u: drift.DriftWeights.load(_user_file(FLAGS.weights, u)) for u in users}
    else:
      single = drift.DriftWeights.load(FLAGS.weights)
      weights = {u: single for u in users}
  except (OSError, ValueError) as e:
    raise app.UsageError(f"--weights: {e}") from e
  name = FLAGS.model or next(iter(weights.values())).model
  if not name:
    raise app.UsageError("the weights record no model; pass --model")
  model, tok = load_model(name, dtype=FLAGS.dtype or None)
  right = total = 0
  for user, pairs in users.items():
    scores = drift.predict(weights[user], model, tok, pairs, batch_size=FLAGS.batch_size,
                           progress=f"predict {user or 'pairs'}")
    hits = int((scores > 0).sum())
    right, total = right + hits, total + len(pairs)
    print(f"{user or 'pairs'}: {hits}/{len(pairs)} = {hits / len(pairs):.3f}")
  print(f"drift accuracy = {right / total:.3f}")


def run():
  """Console entry point."""
  common.run(main)


if __name__ == "__main__":
  run()
