"""persomux: Persona-Mux soft prompts for frozen Llama and Gemma trunks in JAX/Flax.

The public API is imported lazily so that `import persomux` stays cheap and
never imports torch.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "persomux.models.params",
    "save_model": "persomux.models.params",
    "TrunkConfig": "persomux.models.config",
    "Trunk": "persomux.models.modeling",
    "param_counts": "persomux.prompts",
    "generate": "persomux.sampling",
    "SoftPrompts": "persomux.sampling",
    "PersonaMux": "persomux.prompts",
    "SoftPrompt": "persomux.prompts",
    "RandomCodebook": "persomux.prompts",
    "PersonaBank": "persomux.bank",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'persomux' has no attribute {name!r}")
