"""Export to the PyTorch ecosystem: PEFT adapters, a safetensors state file,
and `torch_prompts` (importable without JAX) for splicing soft tokens."""
