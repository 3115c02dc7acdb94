r"""Drift on a preference benchmark with a hidden mapping (offline, seeded).

  python launch/benchmark_preferences.py --out=runs/prefs [--model=smollm2-135m-instruct]

1. Candidates: the model answers shared prompts (everyday messages) under
   varied instructions (`persomux.preference_bench.INSTRUCTIONS`), sampled.
2. A deterministic judge scores every candidate on six principles (length,
   formality, humour, lists, questions, politeness); simulated users weigh
   them through a hidden random signed mapping from their attributes.
3. For each user, preference pairs on training prompts; Drift is fitted on
   10, 25, 50 and 100 of them and predicts pairs on held-out prompts,
   against a logistic regression on the same W - L features and chance.
4. For a few users, Drift-steered replies to held-out prompts against plain
   ones, with Best-of-8 by the fitted weights as the peer: the judge's
   utility gain (Delta score).

Writes OUT/preferences.md, OUT/preferences.json and OUT/preferences.png. The
candidates and their log-probabilities (most of the time) are kept in
OUT/pool.json, so a rerun with the same model, prompts and seed (say, other
pair counts, users or beta) reuses them.
"""

import json
import os
import time

if __package__:  # imported as launch.benchmark_preferences: installed, python -m, or a console entry point
  from launch import common  # noqa: F401
else:  # python launch/benchmark_preferences.py from a checkout (sys.path[0] is launch/)
  import common  # noqa: F401
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_string("model", "smollm2-135m-instruct", "Generator and small LM (a load_model path or shipped name).")
flags.DEFINE_integer("users", 8, "Simulated users.")
flags.DEFINE_integer("prompts", 24, "Shared prompts (2/3 for training pairs, 1/3 held out).")
flags.DEFINE_list("pair_counts", ["10", "25", "50", "100"], "Training pairs per user.")
flags.DEFINE_integer("k", 7, "Attributes Drift keeps.")
flags.DEFINE_integer("gen_users", 3, "Users whose steered generations are judged.")
flags.DEFINE_integer("gen_prompts", 4, "Held-out prompts per judged user.")
flags.DEFINE_integer("best_of", 8, "N of the Best-of-N peer.")
flags.DEFINE_integer("max_new_tokens", 48, "Reply length.")
flags.DEFINE_float("beta", 0.5, "Drift strength.")
flags.DEFINE_integer("batch_size", 16, "Rows per scoring / generation batch.")
flags.DEFINE_integer("seed", 0, "Seed of the users, the hidden mapping, the prompts and the sampling.")


def _chat_rows(tok, system, messages):
  from persomux import drift

  return [(drift._prompt_ids(tok, system, m) if system else _user_only(tok, m), 0) for m in messages]


def _user_only(tok, message):
  if getattr(tok, "chat_template", None):
    text = tok.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                   add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])
  return list(tok(message + "\n", add_special_tokens=True)["input_ids"])


def _read_pool(path: str, key: dict) -> dict:
  """The pool stored at `path` if it was made under `key`, else a new one."""
  try:
    with open(path) as f:
      pool = json.load(f)
  except FileNotFoundError:
    return {"key": key}
  except (OSError, ValueError) as e:
    raise app.UsageError(f"{path}: not a readable pool ({e}); delete it to score again") from e
  if pool.get("key") != key:
    changed = sorted(k for k in key if pool.get("key", {}).get(k) != key[k])
    print(f"{path}: made with other settings ({', '.join(changed)}); scoring again")
    return {"key": key}
  return pool


def main(argv):
  del argv
  import numpy as np
  from tqdm.auto import tqdm

  from persomux import drift, personas_en, sampling, stages
  from persomux import preference_bench as pb
  from persomux.models.params import load_model

  t0 = time.time()
  os.makedirs(FLAGS.out, exist_ok=True)
  rng = np.random.default_rng(FLAGS.seed)
  model, tok = load_model(FLAGS.model)
  contexts = [c.text for c in personas_en.CONTEXTS]
  prompts = [contexts[i] for i in rng.permutation(len(contexts))[:FLAGS.prompts]]
  n_train = (2 * len(prompts)) // 3
  gen = lambda rows, **kw: sampling.generate_rows(model, tok, rows, max_new_tokens=FLAGS.max_new_tokens, **kw)

  attrs = drift.DEFAULT_ATTRIBUTES
  names = list(attrs)
  # The scored pool (steps 1 and 2, most of the time) is kept in OUT/pool.json and reused by a
  # later run with the same model, prompts, instructions, attributes, seed and reply length.
  key = {"model": FLAGS.model, "prompts": prompts, "instructions": list(pb.INSTRUCTIONS), "seed": FLAGS.seed,
         "max_new_tokens": FLAGS.max_new_tokens, "base_prompt": drift.BASE_PROMPT, "attributes": attrs}
  pool_path = os.path.join(FLAGS.out, "pool.json")
  pool = _read_pool(pool_path, key)

  # 1. Candidates: every prompt under every instruction.
  if "candidates" not in pool:
    cands, cand_prompt, groups = [], [], []
    for j, x in enumerate(tqdm(prompts, desc="candidates")):
      rows = [(drift._prompt_ids(tok, ins, x), 0) for ins in pb.INSTRUCTIONS]
      texts = gen(rows, temperature=0.8, top_p=0.95, seed=FLAGS.seed * 1000 + j)
      groups.append(list(range(len(cands), len(cands) + len(texts))))
      cands += texts
      cand_prompt += [x] * len(texts)
    pool.update(candidates=cands, candidate_prompts=cand_prompt, groups=groups)
    stages._write_json(pool_path, pool, indent=None)  # atomic: a killed run keeps the last pool
  cands, cand_prompt, groups = pool["candidates"], pool["candidate_prompts"], pool["groups"]
  raw = np.stack([pb.judge(t) for t in cands])
  mean, std = pb.standardize(raw)
  z = pb.zscores(raw, mean, std)

  # 2. Every candidate under the base and every attribute prompt, once for all users.
  if "logprobs" not in pool:
    pool["logprobs"] = drift.logprobs(model, tok, [drift.BASE_PROMPT, *attrs.values()], cand_prompt, cands,
                                      batch_size=FLAGS.batch_size, progress="attribute log-probabilities").tolist()
    stages._write_json(pool_path, pool, indent=None)  # atomic: a killed run keeps the last pool
  else:
    print(f"reusing the scored pool in {pool_path} ({len(cands)} candidates)")
  lp = np.asarray(pool["logprobs"])
  gain = lp[1:] - lp[:1]  # [A, N]: log π(y | x, s_i) − log π(y | x, s₀)

  # 3. Preference prediction.
  users = pb.make_users(FLAGS.users, seed=FLAGS.seed)
  counts = [int(c) for c in FLAGS.pair_counts]
  acc = {m: {n: [] for n in counts} for m in ("drift", "logistic", "chance")}
  fitted = {}
  for u in range(FLAGS.users):
    util = users.utility(u, z)
    train_pairs = pb.preference_pairs(util, groups[:n_train], rng)
    test_pairs = pb.preference_pairs(util, groups[n_train:], rng)
    feats = lambda pairs: np.array([gain[:, c] - gain[:, r] for c, r in pairs])
    test_f = feats(test_pairs)
    for n in counts:
      if len(train_pairs) < n or not len(test_f):
        continue
      train_f = feats(train_pairs[:n])
      w = drift.DriftWeights(dict(attrs), drift.BASE_PROMPT, train_f.sum(0), np.zeros(len(names)),
                             np.zeros(len(names)), n, FLAGS.k, FLAGS.model, f"user{u}")
      keep = w.selected
      acc["drift"][n].append(float(np.mean(test_f[:, keep] @ w.p[keep] > 0)))
      acc["logistic"][n].append(pb.logistic_accuracy(train_f, test_f))
      acc["chance"][n].append(0.5)
      fitted.setdefault(u, {})[n] = w

  # 4. Steered generation on held-out prompts, for each pair count: Drift and
  #    Best-of-N by the same fitted weights, against plain sampling.
  delta = {m: {n: [] for n in counts} for m in ("drift", "best_of_n")}
  held = prompts[n_train:][:FLAGS.gen_prompts]
  for u in tqdm(list(fitted)[:FLAGS.gen_users], desc="steered generation"):
    rows = [(_user_only(tok, x), 0) for x in held]
    seed = FLAGS.seed * 7919 + u
    judged = lambda texts: users.utility(u, pb.zscores(np.stack([pb.judge(t) for t in texts]), mean, std))
    base_u = judged(gen(rows, temperature=1.0, top_p=0.9, seed=seed))
    many = gen([r for r in rows for _ in range(FLAGS.best_of)], temperature=1.0, top_p=0.9, seed=seed + 1)
    used = sorted({int(i) for w in fitted[u].values() for i in w.selected})  # attributes any count keeps
    lp_many = drift.logprobs(model, tok, [drift.BASE_PROMPT] + [attrs[names[i]] for i in used],
                             [x for x in held for _ in range(FLAGS.best_of)], many, batch_size=FLAGS.batch_size)
    gain_many = dict(zip(used, lp_many[1:] - lp_many[:1]))
    for n, w in fitted[u].items():
      steered = gen(rows, temperature=1.0, top_p=0.9, seed=seed,
                    logit_streams=drift.streams(model, tok, [w] * len(held), held, beta=FLAGS.beta))
      keep = w.selected
      score = sum(w.p[i] * gain_many[int(i)] for i in keep)
      best = [many[i * FLAGS.best_of + int(np.argmax(score[i * FLAGS.best_of:(i + 1) * FLAGS.best_of]))]
              for i in range(len(held))]
      delta["drift"][n].append(float(np.mean(judged(steered) - base_u)))
      delta["best_of_n"][n].append(float(np.mean(judged(best) - base_u)))

  # Report.
  mean_of = lambda xs: float(np.mean(xs)) if xs else float("nan")
  lines = [f"# Drift on a hidden-mapping preference benchmark ({FLAGS.model})", "",
           f"{FLAGS.users} users, {len(prompts)} prompts x {len(pb.INSTRUCTIONS)} candidates, "
           f"{len(attrs)} attributes, K={FLAGS.k}, seed {FLAGS.seed}.", "",
           f"Accuracy: held-out preference prediction. ΔScore: the judge's utility gain over plain sampling on "
           f"held-out prompts ({min(len(fitted), FLAGS.gen_users)} users x {len(held)} prompts, standardized "
           f"principle units), of Drift-steered generation and of Best-of-{FLAGS.best_of} by the same weights.", "",
           f"| training pairs per user | Drift accuracy | logistic regression (same W - L features) | chance | users "
           f"| Drift ΔScore | Best-of-{FLAGS.best_of} ΔScore |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for n in counts:
    lines.append(f"| {n} | {mean_of(acc['drift'][n]):.3f} | {mean_of(acc['logistic'][n]):.3f} | 0.500 | "
                 f"{len(acc['drift'][n])} | {mean_of(delta['drift'][n]):+.3f} | {mean_of(delta['best_of_n'][n]):+.3f} |")
  lines += ["", f"Time: {time.time() - t0:.0f} s."]
  report = "\n".join(lines)
  print(report)
  with open(os.path.join(FLAGS.out, "preferences.md"), "w") as f:
    f.write(report + "\n")
  with open(os.path.join(FLAGS.out, "preferences.json"), "w") as f:
    json.dump({"accuracy": {m: {str(n): v for n, v in a.items()} for m, a in acc.items()},
               "delta": {m: {str(n): v for n, v in d.items()} for m, d in delta.items()},
               "model": FLAGS.model, "seed": FLAGS.seed}, f, indent=1)
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.5))
  for m in ("drift", "logistic", "chance"):
    ax.plot(counts, [mean_of(acc[m][n]) for n in counts], marker="o", label=m)
  ax.set_xlabel("training pairs per user")
  ax.set_ylabel("held-out accuracy")
  ax.legend()
  for m, label in (("drift", "Drift"), ("best_of_n", f"Best-of-{FLAGS.best_of}")):
    bx.plot(counts, [mean_of(delta[m][n]) for n in counts], marker="o", label=label)
  bx.axhline(0.0, color="grey", lw=0.8)
  bx.set_xlabel("training pairs per user")
  bx.set_ylabel("ΔScore over plain sampling")
  bx.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(FLAGS.out, "preferences.png"), dpi=120)


def run():
  """Console entry point."""
  common.run(main)


if __name__ == "__main__":
  run()
