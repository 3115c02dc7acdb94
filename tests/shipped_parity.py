"""Logit parity of the shipped GGUF models with transformers' own GGUF loading.

Run as a script (`python tests/shipped_parity.py NAME...`) by `tests/test_gguf.py`
in a fresh process, because the float64 figures need `jax_enable_x64` from the
start. Prints one JSON object: per model, the largest |Δlogit| over real tokens
against transformers with eager attention and with SDPA, on XLA's default CPU
matmuls and on its Eigen matmuls (`ACCURATE`, chosen per compiled function), how
far transformers' eager float32 logits and ours are from persomux's float64
computation of the same model (float32 rounding on each side), the loaded
config's shape, and for SmolLM2 a greedy chat reply from both.

Each model's GGUF file is dequantized once: the float32 and float64 trunks are
built from the same dequantized tensors (dequantized values are float32, so the
float64 trunk holds exactly the float32 one's weights).
"""

import json
import os
import sys

import jax

jax.config.update("jax_enable_x64", True)  # float64 runs for the rounding figures; float32 runs stay float32

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import persomux  # noqa: E402
from persomux import sampling  # noqa: E402
from persomux.models import gguf as pm_gguf  # noqa: E402
from persomux.models import shipped  # noqa: E402

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Persona-Mux shares one codebook of soft prompts across thousands of personas.",
             "Paris is the capital of France, and Berlin is the capital of Germany."]
# XLA's default CPU matmul (YNNPACK) accumulates float32 products about twice as
# coarsely as numpy's, torch's or XLA's own Eigen path (a 576-long dot: 1.1e-4
# against 5.0e-5 from float64), and 30 real layers carry that into the logits;
# the 1e-4 figures use the Eigen path.
ACCURATE = {"xla_cpu_experimental_ynn_fusion_type": ""}
GREEDY_TOKENS = 24


def _forward(model, compiler_options=None):
  graphdef, state = nnx.split(model)
  f = jax.jit(lambda s, ids, attn: nnx.merge(graphdef, s)(ids, attention_mask=attn),
              compiler_options=compiler_options)
  return lambda ids, attn: np.asarray(f(state, jnp.asarray(ids), jnp.asarray(attn)))


def _open_once(path: str) -> pm_gguf.GGUFFile:
  """The GGUF file, its `fetch` memoized: each tensor is dequantized once for every trunk built from it."""
  f = pm_gguf.GGUFFile(path)
  fetch, memo = f.fetch, {}

  def once(mpath, shape):
    if mpath not in memo:
      memo[mpath] = fetch(mpath, shape)
    return memo[mpath]

  f.fetch = once
  return f


def parity(name: str) -> dict:
  f = _open_once(shipped.resolve(name))
  model, tok = pm_gguf.load_trunk(f), pm_gguf.load_tokenizer(f)
  enc = tok(SENTENCES, return_tensors="np", padding=True)
  ids, attn = enc["input_ids"], enc["attention_mask"]
  real = attn.astype(bool)
  ours = {"default": _forward(model)(ids, attn), "accurate": _forward(model, ACCURATE)(ids, attn)}
  cfg = model.config
  out = {"family": cfg.family, "num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size,
         "dtype": str(model.dtype), "max_abs_logit": float(np.abs(ours["accurate"][real]).max())}
  exact = _forward(pm_gguf.load_trunk(f, dtype="float64"), ACCURATE)(ids, attn)  # what float32 rounding costs
  directory, file = os.path.split(f.path)
  hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32,
                                            attn_implementation="eager").eval()
  with torch.no_grad():
    for impl in ("eager", "sdpa"):  # one load (dequantizing is most of the time), both attention kernels
      hf.set_attn_implementation(impl)
      ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attn)).logits.numpy()
      out[impl] = float(np.abs(ours["accurate"] - ref)[real].max())
      if impl == "eager":
        out["default_matmuls"] = float(np.abs(ours["default"] - ref)[real].max())
        out["transformers_vs_float64"] = float(np.abs(ref - exact)[real].max())
  out["float32_vs_float64"] = float(np.abs(ours["accurate"] - exact)[real].max())
  if tok.chat_template and "<|im_start|>" in tok.chat_template:
    out["greedy"] = greedy_chat(model, tok, hf)
  return out


def greedy_chat(model, tok, hf) -> dict:
  """Greedy replies of persomux and transformers to one chat message, with the model's chat template."""
  prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
  ids = tok(prompt, return_tensors="pt")["input_ids"]
  with torch.no_grad():
    ref = hf.generate(ids, max_new_tokens=GREEDY_TOKENS, do_sample=False,
                      pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].numpy()
  ours = sampling.generate_ids(model, ids.numpy(), max_new_tokens=GREEDY_TOKENS, eos_ids=[tok.eos_token_id])[0]
  text = persomux.generate(model, tok, [prompt], max_new_tokens=GREEDY_TOKENS)[0]
  return {"prompt": prompt, "ours": [int(t) for t in ours], "ref": [int(t) for t in ref], "text": text,
          "ref_text": tok.decode(ref, skip_special_tokens=True)}


if __name__ == "__main__":
  print(json.dumps({name: parity(name) for name in sys.argv[1:]}))
