r"""Exports trained Persona-Mux state for PyTorch users.

  python launch/export.py --workdir=runs/demo --format=peft --persona=persona_0006 --bias_scale=0.5 --out=out/p6
  python launch/export.py --workdir=runs/demo --format=safetensors --out=out/state

peft: the persona's soft prompt (bias scaled; l + k tokens, k when the scale
is 0) as a PEFT prompt-tuning adapter, loadable with
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), OUT)`.
PEFT places it before the whole input; `persomux.export.torch_prompts`
places it after a persona text, as training did.
safetensors: OUT/persona_mux.safetensors with `codebook`, `bias`, `mixtures`
and the class names and config as metadata.
The trunk is the workdir's `model_dir`, already a Hugging Face directory.
"""

import common  # noqa: F401
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A run directory with a trained prompt.", required=True)
flags.DEFINE_enum("format", "peft", ["peft", "safetensors"], "What to write.")
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_string("persona", None, "peft: the persona to export.")
flags.DEFINE_float("bias_scale", 1.0, "peft: scale of the bias tokens (0 removes them).")
flags.DEFINE_string("stage", "finetune_persona_mux", "safetensors: which prompt state (prompt/<stage>).")


def main(argv):
  del argv
  from persomux import stages
  from persomux.export import peft_export
  from persomux.models.config import TrunkConfig

  run = stages.load_run(FLAGS.workdir)
  trunk_cfg = TrunkConfig.from_pretrained(run["model_dir"])
  if FLAGS.format == "peft":
    if not FLAGS.persona:
      raise app.UsageError("--format=peft needs --persona=NAME")
    try:
      module, cid, _ = stages.find_persona(FLAGS.workdir, FLAGS.persona, "persona_mux", trunk_cfg.d_model)
    except (KeyError, FileNotFoundError) as e:
      raise app.UsageError(str(e).strip('"')) from e
    soft = peft_export.soft_prompt(module, cid, FLAGS.bias_scale)
    peft_export.write_peft_prompt(FLAGS.out, soft, trunk_cfg, base_model=run["model_dir"])
    print(f"wrote a PEFT prompt-tuning adapter ({soft.shape[0]} virtual tokens) to {FLAGS.out}")
  else:
    module, meta = stages.load_prompt(FLAGS.workdir, FLAGS.stage, trunk_cfg.d_model)
    if meta["method"] not in ("persona_mux", "random_codebook"):
      raise app.UsageError(f"prompt/{FLAGS.stage} is a {meta['method']} prompt, not Persona-Mux state")
    path = peft_export.write_state(FLAGS.out, module, meta["classes"], meta["prompt"])
    print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
