"""Load a GGUF file keeping its quantized matrices packed (`quantization="gguf"`).

Q8_0, Q4_0 and Q4_1 blocks are repacked once into the kernels' tiles (`weight_packing`),
losslessly: Q8_0 -> "q8", Q4_0 and Q4_1 -> "q4". The K-quants most GGUF files use and the
5-bit formats llama.cpp falls back to for rows that do not divide into 256 are requantized
once at load, one matrix at a time (decoded by the `gguf` package): Q4_K -> "q4" (groups of
32 with scale and minimum, as Q4_K's sub-blocks are), Q5_0, Q5_1, Q5_K and Q6_K -> "q8"
(int8 per block of 32 with an fp16 scale: finer than their 5-6 bits). Their quality cost is
measured in benchmarks/README.md. Float tensors (norms, any F32/F16/BF16 matrix) are read as
float32. No float copy of the model is kept; only the tokenizer and config are cached, in a
folder beside the dequantized models (`<name>-<fingerprint>-packed`).

GGUF blocks of 32 weights along a row (llama.cpp's ggml-common.h layouts):
- Q8_0 (34 bytes): fp16 d, 32 int8 q;                 w = d * q
- Q4_0 (18 bytes): fp16 d, 16 bytes q;                w = d * (q - 8)
- Q4_1 (20 bytes): fp16 d, fp16 m, 16 bytes q;        w = d * q + m
with 4-bit weight i < 16 in the low nibble of byte i and weight 16 + i in its high nibble.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvcache.errors import ModelFormatError
from kvcache.models.config import LlamaConfig
from kvcache.models.gguf_convert import (convert_tokenizer, file_fingerprint, folder_written_atomically, gguf_hf_config,
                                         hf_tensor_name, read_gguf, rope_heads, unpermute_rope_rows)
from kvcache.models.weight_packing import (BLOCK, PackedWeight, pack_q4_bytes, pack_q8, quantize_int4,
                                           quantize_q8_blocks)
from kvcache.paths import cache_home

#: GGUF types kept packed, by the kernels' format that holds them.
KEPT_FORMATS = {"Q8_0": "q8", "Q4_0": "q4", "Q4_1": "q4",
                "Q4_K": "q4", "Q5_0": "q8", "Q5_1": "q8", "Q5_K": "q8", "Q6_K": "q8"}
#: Of those, the types requantized at load (the others are repacked bit for bit).
REQUANTIZED_TYPES = ("Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K")
PACKED_TYPES = tuple(KEPT_FORMATS)
FLOAT_TYPES = ("F32", "F16", "BF16")
_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def _half(b: np.ndarray, at: int) -> torch.Tensor:
    """The fp16 at byte `at` of each block (N, nb, block bytes): (N, nb) float16."""
    return torch.from_numpy(np.ascontiguousarray(b[:, :, at:at + 2]).view("<f2")[:, :, 0].copy())


def _chunk_bytes(qs: np.ndarray) -> torch.Tensor:
    """GGUF 4-bit bytes (N, nb, 16) (weight i low, 16 + i high) -> our chunk bytes (N, nb, 4, 4)
    (`weight_packing.q4_bytes`: chunk c, byte e holds weights 8c+e low and 8c+4+e high).
    Four bytes at a time: word 2c'+h holds weights 8c'+4h .. 8c'+4h+3 (low) and 16 more (high)."""
    n, nb = qs.shape[0], qs.shape[1]
    w = np.ascontiguousarray(qs).view("<u4")  # (N, nb, 4)
    a, b = w[:, :, 0::2], w[:, :, 1::2]  # (N, nb, 2): h = 0, 1
    low = (a & 0x0F0F0F0F) | ((b & 0x0F0F0F0F) << 4)  # chunks 0, 1: weights 0-15
    high = ((a >> 4) & 0x0F0F0F0F) | (b & 0xF0F0F0F0)  # chunks 2, 3: weights 16-31
    return torch.from_numpy(np.concatenate([low, high], 2).view(np.uint8)).view(n, nb, 4, 4)


def decode_blocks(raw: np.ndarray, type_name: str) -> PackedWeight:
    """GGUF blocks of a matrix, rows (N, K/32 * block bytes) uint8, as a `PackedWeight`."""
    if type_name in REQUANTIZED_TYPES:
        return requantize_blocks(raw, type_name)
    b = raw.reshape(raw.shape[0], -1, _BLOCK_BYTES[type_name])  # (N, nb, block bytes)
    n, nb = b.shape[0], b.shape[1]
    if type_name == "Q8_0":
        codes = torch.from_numpy(np.ascontiguousarray(b[:, :, 2:]).view(np.int8).reshape(n, nb * BLOCK))
        return pack_q8(codes, _half(b, 0), "Q8_0")
    if type_name == "Q4_0":
        d = _half(b, 0)
        return pack_q4_bytes(_chunk_bytes(b[:, :, 2:]), d, d * -8, "Q4_0")  # d * (q - 8) = d * q - 8d, exact in fp16
    if type_name == "Q4_1":
        return pack_q4_bytes(_chunk_bytes(b[:, :, 4:]), _half(b, 0), _half(b, 2), "Q4_1")
    raise ValueError(f"not a packed GGUF type: {type_name}")


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


def _unsupported(path: Path, name: str, type_name: str) -> ModelFormatError:
    return ModelFormatError(
        f"{path.name} stores {name} as {type_name}, which quantization='gguf' cannot keep packed (it keeps "
        f"{', '.join(PACKED_TYPES)} and reads {', '.join(FLOAT_TYPES)}); load it with quantization='none', "
        "'int8' or 'int4', which dequantize it first.")


def _meta_dir(path: Path) -> Path:
    """The cached folder with config.json and the tokenizer of a GGUF (no weights); the GGUF's
    metadata is parsed in full only to build it."""
    out = cache_home() / "models" / f"{path.stem}-{file_fingerprint(path)}-packed"
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


_GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 30: "BF16"}
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass
class TensorEntry:
    """Where a tensor sits in a GGUF file."""

    name: str
    type_name: str  # "Q4_1", "F32", ... (other types by their ggml name)
    shape: tuple[int, ...]  # (rows, row length): numpy order, the reverse of GGUF's dims
    offset: int  # absolute, in bytes


def _type_name(code: int) -> str:
    if code in _GGML_TYPES:
        return _GGML_TYPES[code]
    import gguf

    try:
        return gguf.GGMLQuantizationType(code).name
    except ValueError:
        return f"type {code}"


def tensor_index(path: Path) -> list[TensorEntry]:
    """The tensors of a GGUF file (v2 or v3), read from its header without parsing the metadata
    values (the tokenizer's vocabulary makes a full parse take seconds)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 0

        def take(fmt: str):
            nonlocal pos
            value = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return value[0] if len(value) == 1 else value

        def string() -> str:
            nonlocal pos
            n = take("<Q")
            pos += n
            return bytes(buf[pos - n:pos]).decode("utf-8", "replace")

        def skip_value(vtype: int) -> None:
            nonlocal pos
            if vtype == 8:
                n = take("<Q")
                pos += n
            elif vtype == 9:
                item, count = take("<I"), take("<Q")
                if item in (8, 9):
                    for _ in range(count):
                        skip_value(item)
                else:
                    pos += struct.calcsize(_SCALAR[item]) * count
            else:
                pos += struct.calcsize(_SCALAR[vtype])

        try:
            if buf[:4] != b"GGUF":
                raise ValueError("no GGUF magic")
            pos = 4
            version = take("<I")
            if version < 2:
                raise ValueError(f"GGUF version {version}")
            n_tensors, n_kv = take("<Q"), take("<Q")
            alignment = 32
            for _ in range(n_kv):
                key, vtype = string(), take("<I")
                if key == "general.alignment":
                    alignment = int(take(_SCALAR[vtype]))
                else:
                    skip_value(vtype)
            infos = []
            for _ in range(n_tensors):
                name = string()
                n_dims = take("<I")
                dims = take(f"<{n_dims}Q") if n_dims > 1 else (take("<Q"),)
                code, offset = take("<I"), take("<Q")
                infos.append((name, code, tuple(int(d) for d in dims[::-1]), offset))
        except (ValueError, KeyError, struct.error) as exc:
            raise ModelFormatError(f"{path} is not a readable GGUF file ({exc}).") from None
        start = -(-pos // alignment) * alignment
    return [TensorEntry(name, _type_name(code), shape, start + off) for name, code, shape, off in infos]


def _read(buf: np.ndarray, t: TensorEntry) -> np.ndarray:
    """A tensor's bytes as (rows, row bytes) for block types, or its float32 values."""
    rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
    k = t.shape[-1]
    if t.type_name in _BLOCK_BYTES:
        size = rows * k // BLOCK * _BLOCK_BYTES[t.type_name]
        return buf[t.offset:t.offset + size].reshape(rows, -1)
    if t.type_name in REQUANTIZED_TYPES:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.type_name]]
        return buf[t.offset:t.offset + rows * k // block * size].reshape(rows, -1)
    if t.type_name == "BF16":
        raw = buf[t.offset:t.offset + rows * k * 2].view("<u2").astype(np.uint32) << 16
        return raw.view(np.float32).reshape(t.shape)
    dtype = "<f4" if t.type_name == "F32" else "<f2"
    return buf[t.offset:t.offset + rows * k * np.dtype(dtype).itemsize].view(dtype).astype(np.float32).reshape(t.shape)


def check_types(path: Path) -> list[TensorEntry]:
    """The file's tensor index, after checking that every tensor the model uses can be kept."""
    index = tensor_index(path)
    for t in index:
        if hf_tensor_name(t.name) and t.type_name not in PACKED_TYPES and t.type_name not in FLOAT_TYPES:
            raise _unsupported(path, t.name, t.type_name)
    return index


def keeps_packed(path: Path) -> bool:
    """Whether `quantization="gguf"` can load this file and holds some matrix packed: every
    tensor the model uses is in a kept format, and some are quantized."""
    try:
        index = check_types(path)
    except (ModelFormatError, OSError):
        return False
    return any(t.type_name in PACKED_TYPES for t in index if hf_tensor_name(t.name))


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
            arr = _read(buf, t)
            rope = rope_heads(t.name, heads, kv_heads)
            if rope:
                arr = unpermute_rope_rows(arr, rope)
            state[hf_name] = (decode_blocks(arr, t.type_name) if t.type_name in PACKED_TYPES
                              else torch.from_numpy(np.array(arr, dtype=np.float32)))
        except Exception as exc:
            raise ModelFormatError(f"{path} has an unreadable tensor {t.name} ({exc}).") from None
        _release_pages(mapped, t.offset, arr.nbytes)  # repacked into a copy: the file's pages can go
    return state


def _release_pages(mapped: mmap.mmap, offset: int, size: int) -> None:
    """Drop the pages of [offset, offset + size) from this process (they stay in the page cache),
    so that loading holds one tensor of the file at a time besides what it has repacked."""
    start = offset - offset % mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, start, min(offset + size, len(mapped)) - start)


def load_gguf_packed(path: Path):
    """A `loader.LoadedModel` of a GGUF whose quantized matrices stay packed (`gguf_state_dict`)."""
    from kvcache.models.loader import LoadedModel, load_tokenizer, read_hf_config

    check_types(path)  # before the tokenizer is converted
    meta = _meta_dir(path)
    config = LlamaConfig.from_hf(read_hf_config(meta))
    state = gguf_state_dict(path, config.num_heads, config.num_kv_heads)
    return LoadedModel(name=path.stem, model_dir=meta, config=config, state_dict=state, tokenizer=load_tokenizer(meta))
