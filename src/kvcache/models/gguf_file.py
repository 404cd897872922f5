"""A GGUF file's tensors, read without torch: the header's tensor index, a tensor's bytes, and
the lossless repacking of Q8_0 / Q4_0 / Q4_1 blocks into the kernels' tiles (`packed_tiles`).
Used by the model's loader (`gguf_weights`) and by the torch-free runtime (`kvcache.solo`).

GGUF blocks of 32 weights along a row (llama.cpp's ggml-common.h layouts):
- Q8_0 (34 bytes): fp16 d, 32 int8 q;                 w = d * q
- Q4_0 (18 bytes): fp16 d, 16 bytes q;                w = d * (q - 8)
- Q4_1 (20 bytes): fp16 d, fp16 m, 16 bytes q;        w = d * q + m
with 4-bit weight i < 16 in the low nibble of byte i and weight 16 + i in its high nibble.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvcache.errors import ModelFormatError
from kvcache.models.packed_tiles import BLOCK, q4_tiles, q8_tiles, tiles_by_row_blocks
from kvcache.paths import cache_home

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def file_fingerprint(path: Path) -> str:
    """Cheap content fingerprint: size + SHA-256 of the first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation (interleaved pairs -> rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensor_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (`blk.3.attn_q.weight` ->
    `model.layers.3.self_attn.q_proj.weight`), or None for tensors the model does not use."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return _GLOBAL_NAMES.get(name)


def rope_heads(name: str, heads: int, kv_heads: int) -> int | None:
    """The head count whose RoPE row permutation a GGUF tensor carries (Q and K weights), else None."""
    base = name.split(".")[2] if name.startswith("blk.") and name.count(".") == 3 else None
    return {"attn_q": heads, "attn_k": kv_heads}.get(base)


#: GGUF types kept packed, by the kernels' format that holds them.
KEPT_FORMATS = {"Q8_0": "q8", "Q4_0": "q4", "Q4_1": "q4",
                "Q4_K": "q4", "Q5_0": "q8", "Q5_1": "q8", "Q5_K": "q8", "Q6_K": "q8"}
#: Of those, the types requantized at load (the others are repacked bit for bit).
REQUANTIZED_TYPES = ("Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K")
PACKED_TYPES = tuple(KEPT_FORMATS)
FLOAT_TYPES = ("F32", "F16", "BF16")
GGUF_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


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


def read_tensor(buf: np.ndarray, t: TensorEntry) -> np.ndarray:
    """A tensor's bytes as (rows, row bytes) for block types, or its float32 values."""
    rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
    k = t.shape[-1]
    if t.type_name in GGUF_BLOCK_BYTES:
        size = rows * k // BLOCK * GGUF_BLOCK_BYTES[t.type_name]
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


def _unsupported(path: Path, name: str, type_name: str) -> ModelFormatError:
    return ModelFormatError(
        f"{path.name} stores {name} as {type_name}, which quantization='gguf' cannot keep packed (it keeps "
        f"{', '.join(PACKED_TYPES)} and reads {', '.join(FLOAT_TYPES)}); load it with quantization='none', "
        "'int8' or 'int4', which dequantize it first.")


def check_rope_factors(path: Path, names) -> None:
    """One sentence for a GGUF that scales RoPE by frequency factors (`rope_freqs.weight`, as
    Llama 3.1 files do): the model would run, and its output would be wrong."""
    if "rope_freqs.weight" in names:
        raise ModelFormatError(f"{path.name} scales its RoPE by frequency factors (rope_freqs.weight), which kvcache "
                               "does not apply; its output would be wrong.")


def check_types(path: Path) -> list[TensorEntry]:
    """The file's tensor index, after checking that every tensor the model uses can be kept
    (and that it does not scale RoPE by factors, `check_rope_factors`)."""
    index = tensor_index(path)
    check_rope_factors(path, {t.name for t in index})
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


def half_at(b: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte `at` of each block (N, nb, block bytes): (N, nb) float16."""
    return np.ascontiguousarray(b[:, :, at:at + 2]).view("<f2")[:, :, 0].copy()


def chunk_bytes(qs: np.ndarray) -> np.ndarray:
    """GGUF 4-bit bytes (N, nb, 16) (weight i low, 16 + i high) -> our chunk bytes (N, nb, 4, 4)
    (`weight_packing.q4_bytes`: chunk c, byte e holds weights 8c+e low and 8c+4+e high).
    Four bytes at a time: word 2c'+h holds weights 8c'+4h .. 8c'+4h+3 (low) and 16 more (high)."""
    n, nb = qs.shape[0], qs.shape[1]
    w = np.ascontiguousarray(qs).view("<u4")  # (N, nb, 4)
    a, b = w[:, :, 0::2], w[:, :, 1::2]  # (N, nb, 2): h = 0, 1
    low = (a & 0x0F0F0F0F) | ((b & 0x0F0F0F0F) << 4)  # chunks 0, 1: weights 0-15
    high = ((a >> 4) & 0x0F0F0F0F) | (b & 0xF0F0F0F0)  # chunks 2, 3: weights 16-31
    return np.concatenate([low, high], 2).view(np.uint8).reshape(n, nb, 4, 4)


def block_tiles(raw: np.ndarray, type_name: str) -> tuple[str, np.ndarray]:
    """GGUF blocks of a Q8_0 / Q4_0 / Q4_1 matrix, rows (N, K/32 * block bytes) uint8, as the
    kernels' (format, tiles), bit for bit, a block of rows at a time (`tiles_by_row_blocks`)."""
    if type_name not in GGUF_BLOCK_BYTES:
        raise ValueError(f"not a losslessly packed GGUF type: {type_name}")
    return KEPT_FORMATS[type_name], tiles_by_row_blocks(raw.shape[0], lambda lo, hi: _rows_tiles(raw[lo:hi], type_name))


def _rows_tiles(raw: np.ndarray, type_name: str) -> np.ndarray:
    """`block_tiles`' tiles of these rows (a whole number of tiles, or the matrix's last rows)."""
    b = raw.reshape(raw.shape[0], -1, GGUF_BLOCK_BYTES[type_name])  # (N, nb, block bytes)
    n, nb = b.shape[0], b.shape[1]
    if type_name == "Q8_0":
        return q8_tiles(np.ascontiguousarray(b[:, :, 2:]).view(np.int8).reshape(n, nb * BLOCK), half_at(b, 0))
    if type_name == "Q4_0":
        d = half_at(b, 0)
        return q4_tiles(chunk_bytes(b[:, :, 2:]), d, d * np.float16(-8))  # d * (q - 8) = d * q - 8d, exact in fp16
    return q4_tiles(chunk_bytes(b[:, :, 4:]), half_at(b, 0), half_at(b, 2))  # Q4_1


def release_pages(mapped: mmap.mmap, offset: int, size: int) -> None:
    """Drop the pages of [offset, offset + size) from this process (they stay in the page cache),
    so that loading holds one tensor of the file at a time besides what it has repacked."""
    start = offset - offset % mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, start, min(offset + size, len(mapped)) - start)


def meta_dir_path(path: Path) -> Path:
    """Where the config.json and tokenizer of a GGUF are cached once converted (`gguf_weights.meta_dir`)."""
    return cache_home() / "models" / f"{path.stem}-{file_fingerprint(path)}-packed"
