"""Logit parity of the shipped GGUF models with transformers' own GGUF loading.

Run as a script (`python tests/shipped_parity.py NAME...`) by `tests/test_gguf.py`
in a fresh process, so that the test can choose XLA's CPU matmul backend with
`XLA_FLAGS` before JAX starts. Prints one JSON object: per model, the largest
|Δlogit| over real tokens against transformers with eager attention and with
SDPA, and the loaded config's shape.
"""

import json
import os
import sys

import jax.numpy as jnp
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
  ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(attn)))
  cfg = model.config
  out = {"family": cfg.family, "num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size,
         "dtype": str(model.dtype), "max_abs_logit": float(np.abs(ours[real]).max())}
  del model
  directory, file = os.path.split(shipped.resolve(name))
  for impl in ("eager", "sdpa"):
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32,
                                              attn_implementation=impl).eval()
    with torch.no_grad():
      ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attn)).logits.numpy()
    out[impl] = float(np.abs(ours - ref)[real].max())
    del hf
  return out


if __name__ == "__main__":
  print(json.dumps({name: parity(name) for name in sys.argv[1:]}))
