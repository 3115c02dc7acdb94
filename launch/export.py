r"""Exports trained Persona-Mux state (or the LoRA baseline) for PyTorch users.

  python launch/export.py --workdir=runs/demo --format=peft --persona=persona_0006 --bias_scale=0.5 --out=out/p6
  python launch/export.py --workdir=runs/demo --format=safetensors --out=out/state
  python launch/export.py --workdir=runs/demo --format=peft --lora --out=out/lora

peft: the persona's soft prompt (bias scaled; l + k tokens, k when the scale
is 0) as a PEFT prompt-tuning adapter, loadable with
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), OUT)`.
PEFT places it before the whole input; `persomux.export.torch_prompts`
places it after a persona text, as training did. With --lora: the LoRA
baseline's adapters (launch/evaluate.py trains them) as a PEFT LoRA adapter.
safetensors: the whole persona bank (`persomux.PersonaBank`: stage 1's
personas, the held-out ones and every add_personas job) as
OUT/persona_bank.safetensors with `codebook`, `bias`, `mixtures` and, as
metadata, each persona's name, job and text persona; `PersonaBank.read`
loads it. With --stage, one prompt state as OUT/persona_mux.safetensors.

The trunk: adapters name the workdir's `model_dir` as their base model when
it is a Hugging Face directory transformers loads as a causal LM with a
tokenizer. Otherwise (e.g. a multimodal Gemma 3 checkpoint, whose text model
the adapters apply to, or a directory without tokenizer files), or with
--export_trunk=always, the trunk is written to OUT/base_model with
`save_model` and the adapter names that instead.
"""

import os

if __package__:  # imported as launch.export: installed, python -m, or a console entry point
  from launch import common  # noqa: F401
else:  # python launch/export.py from a checkout (sys.path[0] is launch/)
  import common  # noqa: F401
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A run directory with a trained prompt.", required=True)
flags.DEFINE_enum("format", "peft", ["peft", "safetensors"], "What to write.")
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_string("persona", None, "peft: the persona to export.")
flags.DEFINE_float("bias_scale", 1.0, "peft: scale of the bias tokens (0 removes them).")
flags.DEFINE_bool("lora", False, "peft: export the LoRA baseline's adapters (prompt/lora) instead of a persona.")
flags.DEFINE_string("stage", None, "safetensors: one prompt state (prompt/<stage>, e.g. pretrain) instead of "
                    "the whole persona bank.")
flags.DEFINE_enum("export_trunk", "auto", ["auto", "always", "never"],
                  "Write the trunk to OUT/base_model: auto = when model_dir is not a plain Hugging Face "
                  "causal-LM directory with a tokenizer.")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def trunk_needs_export(model_dir: str, trunk_cfg) -> str | None:
  """Why the workdir's trunk must be written out for PyTorch users, or None when it can be used as is."""
  if not os.path.isdir(model_dir):
    return "it is a GGUF file (or a shipped model's name), which PyTorch users load as a Hugging Face directory"
  if trunk_cfg.multimodal:
    return "it is a multimodal checkpoint; the adapters apply to its text model"
  if not any(os.path.isfile(os.path.join(model_dir, f)) for f in _TOKENIZER_FILES):
    return "it has no tokenizer files"
  return None


def main(argv):
  del argv
  from persomux import stages
  from persomux.export import peft_export
  from persomux.models import lora as lora_lib
  from persomux.models.params import load_config, load_model, save_model

  run = common.run_config(None, FLAGS.workdir)
  model_dir = run.model_dir
  trunk_cfg = load_config(model_dir)
  why = trunk_needs_export(model_dir, trunk_cfg) if FLAGS.export_trunk == "auto" else None
  write_trunk = FLAGS.format == "peft" and (FLAGS.export_trunk == "always" or why is not None)
  base_model = os.path.join(FLAGS.out, "base_model") if write_trunk else model_dir
  if FLAGS.format == "peft" and FLAGS.lora:
    trunk, _ = load_model(model_dir, dtype="float32", tokenizer=False)
    try:
      meta = stages.load_lora(FLAGS.workdir, trunk)
    except FileNotFoundError as e:
      raise app.UsageError(f"{e}; launch/evaluate.py trains it") from e
    peft_export.write_peft_lora(FLAGS.out, trunk, lora_lib.LoRAConfig.from_config(meta["lora"]), base_model)
    print(f"wrote a PEFT LoRA adapter (rank {meta['lora']['rank']}, {', '.join(meta['lora']['targets'])}) "
          f"to {FLAGS.out}")
  elif FLAGS.format == "peft":
    if not FLAGS.persona:
      raise app.UsageError("--format=peft needs --persona=NAME (or --lora)")
    try:
      module, cid, _ = stages.find_persona(FLAGS.workdir, FLAGS.persona, "persona_mux", trunk_cfg.d_model)
    except (KeyError, FileNotFoundError) as e:
      raise app.UsageError(str(e).strip('"')) from e
    soft = peft_export.soft_prompt(module, cid, FLAGS.bias_scale)
    peft_export.write_peft_prompt(FLAGS.out, soft, trunk_cfg, base_model=base_model)
    print(f"wrote a PEFT prompt-tuning adapter ({soft.shape[0]} virtual tokens) to {FLAGS.out}")
  elif not FLAGS.stage:
    from persomux.bank import PersonaBank

    try:
      bank = PersonaBank.load(FLAGS.workdir)
    except (FileNotFoundError, ValueError) as e:
      raise app.UsageError(str(e)) from e
    path = bank.save(FLAGS.out)
    jobs = sorted({p["job"] for p in bank.describe()})
    print(f"wrote {path}: {len(bank)} personas ({', '.join(jobs)})")
  else:
    module, meta = stages.load_prompt(FLAGS.workdir, FLAGS.stage, trunk_cfg.d_model)
    if meta["method"] not in ("persona_mux", "random_codebook"):
      raise app.UsageError(f"prompt/{FLAGS.stage} is a {meta['method']} prompt, not Persona-Mux state")
    path = peft_export.write_state(FLAGS.out, module, meta["classes"], meta["prompt"])
    print(f"wrote {path}")
  if write_trunk:  # after the adapter, so a bad --persona writes nothing
    has_tok = any(os.path.isfile(os.path.join(model_dir, f)) for f in _TOKENIZER_FILES)
    trunk, tokenizer = load_model(model_dir, dtype=run.dtype or "float32", tokenizer=has_tok)
    save_model(trunk, tokenizer, base_model)
    print(f"wrote the trunk to {base_model}" + (f" ({why})" if why else ""))


def run():
  """Console entry point."""
  common.run(main)


if __name__ == "__main__":
  run()
