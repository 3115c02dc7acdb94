r"""Converts a GGUF checkpoint into a Hugging Face directory.

  python launch/convert.py --gguf=model.Q4_K_M.gguf --out=out/model
  python launch/convert.py --gguf=gemma3-270m --out=out/gemma3 --dtype=bfloat16

--gguf is a `.gguf` file or a shipped model's name ("smollm2-135m-instruct",
"gemma3-270m"). Quantized weights are dequantized (to float32 unless --dtype
says otherwise) and written with `save_model`: safetensors weights,
config.json, and the tokenizer with its chat template from the GGUF metadata.
The directory loads with `transformers.AutoModelForCausalLM.from_pretrained`,
with `persomux.load_model`, and as `--config.model_dir` of the other launches.
"""

if __package__:  # imported as launch.convert: installed, python -m, or a console entry point
  from launch import common  # noqa: F401
else:  # python launch/convert.py from a checkout (sys.path[0] is launch/)
  import common  # noqa: F401
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("gguf", None, "A .gguf file or a shipped model name.", required=True)
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Weight dtype (default: float32).")


def main(argv):
  del argv
  from persomux.models import gguf, shipped
  from persomux.models.params import save_model

  path = shipped.resolve(FLAGS.gguf) if FLAGS.gguf in shipped.NAMES else FLAGS.gguf
  model, tokenizer = gguf.load(path, dtype=FLAGS.dtype, progress=True)
  save_model(model, tokenizer, FLAGS.out)
  cfg = model.config
  print(f"wrote {cfg.family} ({cfg.num_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, "
        f"{model.dtype.name}) to {FLAGS.out}")


def run():
  """Console entry point."""
  common.run(main)


if __name__ == "__main__":
  run()
