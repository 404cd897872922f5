"""A model name -> a ready `SoloGenerator`: the GGUF file, its converted config and tokenizer
(converted once by the engine's loader in a child process, which alone imports torch), the weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kvcache.errors import KVCacheError, ModelFormatError
from kvcache.models.gguf_file import meta_dir_path
from kvcache.models.names import gguf_file
from kvcache.solo.model import SoloModel
from kvcache.solo.runner import SoloGenerator
from kvcache.solo.text import SoloTokenizer

_CONVERT = "import sys; from pathlib import Path; from kvcache.models.gguf_weights import meta_dir; meta_dir(Path(sys.argv[1]))"


def converted_folder(path: Path) -> Path:
    """The cached folder with the GGUF's config.json and tokenizer, written first where missing."""
    folder = meta_dir_path(path)
    if not (folder / "config.json").is_file():
        package_root = str(Path(__file__).resolve().parents[2])  # the folder holding this kvcache, installed or not
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (package_root, os.environ.get("PYTHONPATH"))))}
        done = subprocess.run([sys.executable, "-c", _CONVERT, str(path)], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ModelFormatError(f"Could not read the config and tokenizer of {path.name} ({last}).")
    return folder


def load_solo(model: str, max_len: int | None = None) -> SoloGenerator:
    """The solo runtime for `model` (a built-in name or a .gguf path), K/V sized for `max_len`
    positions (default: the model's context)."""
    path = gguf_file(model)
    if path is None:
        raise KVCacheError(f"the solo runtime runs a GGUF file, and '{model}' is not one; run it with the engine "
                           "(kvcache without --solo).")
    folder = converted_folder(path)
    return SoloGenerator(SoloModel.from_folder(path, folder, max_len), SoloTokenizer(folder))
