"""Persona-Mux soft prompts for any transformers causal LM, in PyTorch (no JAX).

  from persomux.export.torch_prompts import PersonaMuxPrompts
  prompts = PersonaMuxPrompts.from_file("out/persona_mux.safetensors")
  embeds, mask = prompts.splice(model, input_ids, attention_mask, classes=["persona_0006"],
                                soft_index=[len(persona_ids)], bias_scale=0.5)
  model(inputs_embeds=embeds, attention_mask=mask)

The soft prompt of class i is (bias_scale * b) ⊕ (Σ_j m_ij W_j); a bias scale
of exactly 0 removes the bias tokens. Tokens are spliced in before
`soft_index` of each row (right after the persona text), and right padding
moves to the end, as persomux does in JAX.
"""

from __future__ import annotations

import json

import torch
from safetensors import safe_open


class PersonaMuxPrompts(torch.nn.Module):
  def __init__(self, codebook: torch.Tensor, bias: torch.Tensor, mixtures: torch.Tensor, classes: list[str]):
    super().__init__()
    self.codebook = torch.nn.Parameter(codebook, requires_grad=False)  # [n, k, d]
    self.bias = torch.nn.Parameter(bias, requires_grad=False)  # [l, d]
    self.mixtures = torch.nn.Parameter(mixtures, requires_grad=False)  # [classes, n]
    self.classes = list(classes)

  @classmethod
  def from_file(cls, path: str) -> "PersonaMuxPrompts":
    with safe_open(path, framework="pt") as f:
      meta = f.metadata() or {}
      t = {k: f.get_tensor(k) for k in ("codebook", "bias", "mixtures")}
    return cls(t["codebook"], t["bias"], t["mixtures"], json.loads(meta.get("classes", "[]")))

  def soft_prompt(self, cls: int | str, bias_scale: float = 1.0) -> torch.Tensor:
    """`[l + k, d]` soft tokens of one class (`[k, d]` when bias_scale == 0)."""
    i = self.classes.index(cls) if isinstance(cls, str) else int(cls)
    persona = torch.einsum("n,nkd->kd", self.mixtures[i], self.codebook)
    if bias_scale == 0:
      return persona
    return torch.cat([self.bias * bias_scale, persona], dim=0)

  def splice(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, classes, soft_index,
             bias_scale=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`(inputs_embeds [B, T + P, d], attention_mask [B, T + P])` for `model`."""
    embeds = model.get_input_embeddings()(input_ids)
    b, t, d = embeds.shape
    mask = torch.ones(b, t, dtype=torch.long) if attention_mask is None else attention_mask
    scales = bias_scale if isinstance(bias_scale, (list, tuple)) else [bias_scale] * b
    softs = [self.soft_prompt(c, s).to(embeds.dtype) for c, s in zip(classes, scales)]
    width = t + max(s.shape[0] for s in softs)
    out = embeds.new_zeros(b, width, d)
    out_mask = mask.new_zeros(b, width)
    for r in range(b):
      si, real = int(soft_index[r]), int(mask[r].sum())
      row = torch.cat([embeds[r, :si], softs[r], embeds[r, si:real]], dim=0)
      out[r, :row.shape[0]] = row
      out_mask[r, :row.shape[0]] = 1
    return out, out_mask
