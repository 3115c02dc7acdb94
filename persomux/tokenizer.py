"""Byte-level BPE tokenizers trained locally, for tiny test trunks and the demo.

Real users bring the tokenizer that ships with their checkpoint; this module
exists so that tests and the embedded demo never download one.
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}

# A minimal chat template in the Hugging Face Jinja format, so the chat-template
# code path is exercised with a locally trained tokenizer.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512, *, chat_template: bool = False):
  """Trains a byte-level BPE tokenizer on `texts`.

  Returns a `transformers` fast tokenizer with `<pad>`=0, `<bos>`=1, `<eos>`=2,
  `<unk>`=3 that adds `<bos>` at the start of every encoded sequence, like
  Llama and Gemma tokenizers do. Training is deterministic for fixed input.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  extra = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"] if chat_template else []
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(SPECIAL_TOKENS.values()) + extra,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(list(texts), trainer=trainer)
  bos = SPECIAL_TOKENS["bos_token"]
  tok.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
  )
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
  if chat_template:
    fast.chat_template = CHAT_TEMPLATE
  return fast
