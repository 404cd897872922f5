"""Model definitions and loading: `load_model(name)` resolves a name to weights + tokenizer."""

from kvcache.models.config import LlamaConfig
from kvcache.models.loader import DEFAULT_MODEL, LoadedModel, load_model, resolve_model_dir

__all__ = ["DEFAULT_MODEL", "LlamaConfig", "LoadedModel", "load_model", "resolve_model_dir"]
