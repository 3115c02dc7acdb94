"""Logit parity of the shipped GGUF models with transformers' own GGUF loading.

Run as a script (`python tests/shipped_parity.py NAME...`) by `tests/test_gguf.py`
in a fresh process, so that the test can choose XLA's CPU matmul backend with
`XLA_FLAGS` before JAX starts. Prints one JSON object: per model, the largest
|Δlogit| over real tokens against transformers with eager attention and with
SDPA, how far transformers' eager float32 logits and ours are from persomux's
float64 computation of the same model (float32 rounding on each side), and the
loaded config's shape.
"""

import json
import os
import sys

import jax

jax.config.update("jax_enable_x64", True)  # float64 runs for the rounding figures; float32 runs stay float32

import jax.numpy as jnp  # noqa: E402
import numpy as np
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import persomux  # noqa: E402
from persomux.models import shipped  # noqa: E402

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Persona-Mux shares one codebook of soft prompts across thousands of personas.",
             "Paris is the capital of France, and Berlin is the capital of Germany."]


def parity(name: str) -> dict:
  model, tok = persomux.load_model(name)
  enc = tok(SENTENCES, return_tensors="np", padding=True)
  ids, attn = enc["input_ids"], enc["attention_mask"]
  real = attn.astype(bool)
  run = lambda m: np.asarray(m(jnp.asarray(ids), attention_mask=jnp.asarray(attn)))
  ours = run(model)
  cfg = model.config
  out = {"family": cfg.family, "num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size,
         "dtype": str(model.dtype), "max_abs_logit": float(np.abs(ours[real]).max())}
  del model
  exact = run(persomux.load_model(name, tokenizer=False, dtype="float64")[0])  # what float32 rounding costs
  directory, file = os.path.split(shipped.resolve(name))
  hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32,
                                            attn_implementation="eager").eval()
  with torch.no_grad():
    for impl in ("eager", "sdpa"):  # one load (dequantizing is most of the time), both attention kernels
      hf.set_attn_implementation(impl)
      ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attn)).logits.numpy()
      out[impl] = float(np.abs(ours - ref)[real].max())
      if impl == "eager":
        out["transformers_vs_float64"] = float(np.abs(ref - exact)[real].max())
  out["float32_vs_float64"] = float(np.abs(ours - exact)[real].max())
  return out


if __name__ == "__main__":
  print(json.dumps({name: parity(name) for name in sys.argv[1:]}))
