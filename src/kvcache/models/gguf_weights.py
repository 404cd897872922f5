"""Load a GGUF file keeping its quantized matrices packed (`quantization="gguf"`).

Q8_0, Q4_0 and Q4_1 blocks are repacked once into the kernels' tiles (`weight_packing`),
losslessly: Q8_0 -> "q8", Q4_0 and Q4_1 -> "q4". The K-quants most GGUF files use and the
5-bit formats llama.cpp falls back to for rows that do not divide into 256 are requantized
once at load, one matrix at a time (decoded by the `gguf` package): Q4_K -> "q4" (groups of
32 with scale and minimum, as Q4_K's sub-blocks are), Q5_0, Q5_1, Q5_K and Q6_K -> "q8"
(int8 per block of 32 with an fp16 scale: finer than their 5-6 bits). Their quality cost is
measured in benchmarks/README.md. Float tensors (norms, any F32/F16/BF16 matrix) are read as
float32. No float copy of the model is kept; only the tokenizer and config are cached, in a
folder beside the dequantized models (`<name>-<fingerprint>-packed`). The file's index and
the block layouts are `gguf_file`'s.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np
import torch

from kvcache.errors import ModelFormatError
from kvcache.models.config import LlamaConfig
from kvcache.models.gguf_convert import convert_tokenizer, folder_written_atomically, gguf_hf_config, read_gguf
from kvcache.models.gguf_file import (FLOAT_TYPES, GGUF_BLOCK_BYTES, KEPT_FORMATS, PACKED_TYPES, REQUANTIZED_TYPES,
                                      TensorEntry, block_tiles, check_types, hf_tensor_name, keeps_packed,
                                      meta_dir_path, read_tensor, release_pages, rope_heads, tensor_index,
                                      unpermute_rope_rows)
from kvcache.models.weight_packing import BLOCK, PackedWeight, quantize_int4, quantize_q8_blocks

__all__ = ["FLOAT_TYPES", "KEPT_FORMATS", "PACKED_TYPES", "TensorEntry", "check_types", "decode_blocks",
           "gguf_state_dict", "keeps_packed", "load_gguf_packed", "meta_dir", "tensor_index"]


def decode_blocks(raw: np.ndarray, type_name: str) -> PackedWeight:
    """GGUF blocks of a matrix, rows (N, K/32 * block bytes) uint8, as a `PackedWeight`."""
    if type_name in REQUANTIZED_TYPES:
        return requantize_blocks(raw, type_name)
    fmt, tiles = block_tiles(raw, type_name)
    return PackedWeight(fmt, raw.shape[0], raw.shape[1] // GGUF_BLOCK_BYTES[type_name] * BLOCK, torch.from_numpy(tiles),
                        type_name)


def requantize_blocks(raw: np.ndarray, type_name: str) -> PackedWeight:
    """A matrix of one of `REQUANTIZED_TYPES`, rows (N, row bytes) uint8: decoded to float32 by
    the `gguf` package, then quantized into its `KEPT_FORMATS` format."""
    import gguf

    w = torch.from_numpy(gguf.quants.dequantize(np.ascontiguousarray(raw), gguf.GGMLQuantizationType[type_name]))
    w = w.reshape(raw.shape[0], -1)  # (N, K) float32
    if KEPT_FORMATS[type_name] == "q4":
        p = quantize_int4(w, f"a {type_name} matrix")
    else:
        p = quantize_q8_blocks(w)
    p.source = type_name
    return p


def meta_dir(path: Path) -> Path:
    """The cached folder with config.json and the tokenizer of a GGUF (no weights); the GGUF's
    metadata is parsed in full only to build it."""
    out = meta_dir_path(path)
    if (out / "config.json").is_file():
        return out
    reader = read_gguf(path)
    with folder_written_atomically(out) as tmp:
        tok = convert_tokenizer(path, tmp)
        names = {t.name for t in reader.tensors}
        embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
        cfg = gguf_hf_config(reader, int(embd.shape[1]), "output.weight" in names, tok.bos_token_id,
                             tok.eos_token_id)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def gguf_state_dict(path: Path, heads: int, kv_heads: int) -> dict:
    """The tensors of a GGUF under Hugging Face names: Q8_0 / Q4_0 / Q4_1 matrices as
    `PackedWeight`s, the rest float32; Q and K rows put back in the rotate-half order."""
    index = check_types(path)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    buf = np.frombuffer(mapped, dtype=np.uint8)
    state: dict = {}
    for t in index:
        hf_name = hf_tensor_name(t.name)
        if hf_name is None:
            continue
        try:
            arr = read_tensor(buf, t)
            rope = rope_heads(t.name, heads, kv_heads)
            if rope:
                arr = unpermute_rope_rows(arr, rope)
            state[hf_name] = (decode_blocks(arr, t.type_name) if t.type_name in PACKED_TYPES
                              else torch.from_numpy(np.array(arr, dtype=np.float32)))
        except Exception as exc:
            raise ModelFormatError(f"{path} has an unreadable tensor {t.name} ({exc}).") from None
        release_pages(mapped, t.offset, arr.nbytes)  # repacked into a copy: the file's pages can go
    return state


def load_gguf_packed(path: Path):
    """A `loader.LoadedModel` of a GGUF whose quantized matrices stay packed (`gguf_state_dict`)."""
    from kvcache.models.loader import LoadedModel, load_tokenizer, read_hf_config

    check_types(path)  # before the tokenizer is converted
    meta = meta_dir(path)
    config = LlamaConfig.from_hf(read_hf_config(meta))
    state = gguf_state_dict(path, config.num_heads, config.num_kv_heads)
    return LoadedModel(name=path.stem, model_dir=meta, config=config, state_dict=state, tokenizer=load_tokenizer(meta))
