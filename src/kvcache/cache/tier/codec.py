"""One KV block as a tier value: a fixed header, the K and V bytes, a checksum.

Layout (little-endian)::

    magic  b"KVTB"                         4 bytes
    format version                         u16
    dtype code                             u8   (DTYPE_CODES)
    reserved                               u8   (0)
    shape (layers, kv_heads, tokens, dim)  4 x u32
    token ids of the block                 tokens x i64 (guards against a 64-bit hash collision)
    K bytes, then V bytes                  2 x layers*kv_heads*tokens*dim*itemsize
    blake2b-128 of everything above        16 bytes

So a value is exactly `value_bytes(...)` = header + 2 x (block K bytes) + 16, the same for every
block of one model. `decode_block` checks everything before it returns a tensor: a value that
fails any check is refused with `TierValueError` (the caller counts it as a miss).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import torch

__all__ = ["FORMAT_VERSION", "TierValueError", "encode_block", "decode_block", "value_bytes", "header_bytes"]

MAGIC = b"KVTB"
FORMAT_VERSION = 1
DIGEST_BYTES = 16
DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_FIXED = struct.Struct("<4sHBB4I")  # magic, version, dtype, reserved, shape


class TierValueError(ValueError):
    """A tier value that cannot be used: truncated, corrupt (checksum), or for another block."""


def header_bytes(block_size: int) -> int:
    """Bytes a value spends besides the K/V payload: fixed header, token ids, checksum."""
    return _FIXED.size + 8 * block_size + DIGEST_BYTES


def value_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """The exact size of the value of one block of K/V of `shape` (L, Hkv, T, D) each."""
    n = 1
    for s in shape:
        n *= s
    return header_bytes(shape[2]) + 2 * n * torch.empty(0, dtype=dtype).element_size()


def _digest(data) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def _raw(t: torch.Tensor) -> bytes:
    """The bytes of a tensor in memory order (any dtype, bfloat16 included)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()  # (n * itemsize,)


def encode_block(k: torch.Tensor, v: torch.Tensor, token_ids: Sequence[int]) -> bytes:
    """The value of a block whose K and V are (L, Hkv, T, D) on the CPU and whose tokens are `token_ids` (T)."""
    if k.shape != v.shape or k.dtype != v.dtype or k.dim() != 4:
        raise ValueError(f"K {tuple(k.shape)} and V {tuple(v.shape)} must be two (L, Hkv, T, D) tensors alike.")
    if k.dtype not in DTYPE_CODES:
        raise ValueError(f"A tier value cannot hold {k.dtype}.")
    if len(token_ids) != k.shape[2]:
        raise ValueError(f"{len(token_ids)} token ids for a block of {k.shape[2]} tokens.")
    head = _FIXED.pack(MAGIC, FORMAT_VERSION, DTYPE_CODES[k.dtype], 0, *k.shape)
    body = head + struct.pack(f"<{len(token_ids)}q", *token_ids) + _raw(k) + _raw(v)
    return body + _digest(body)


def decode_block(value: bytes, shape: Sequence[int], dtype: torch.dtype,
                 token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V (L, Hkv, T, D) from a value, checked against the block it must be: its size,
    magic, version, checksum, dtype, shape and token ids. `TierValueError` names the first failure."""
    shape = tuple(shape)
    expected = value_bytes(shape, dtype)
    if len(value) != expected:
        raise TierValueError(f"the value has {len(value)} bytes, not the {expected} of a block")
    view = memoryview(value)
    if _digest(view[:-DIGEST_BYTES]) != bytes(view[-DIGEST_BYTES:]):
        raise TierValueError("the value's checksum does not match its bytes")
    magic, version, code, _, *got_shape = _FIXED.unpack_from(view)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise TierValueError(f"the value is not a version-{FORMAT_VERSION} block")
    if code != DTYPE_CODES.get(dtype) or tuple(got_shape) != shape:
        raise TierValueError(f"the value holds another dtype or shape ({tuple(got_shape)})")
    t = shape[2]
    off = _FIXED.size
    if list(struct.unpack_from(f"<{t}q", view, off)) != list(token_ids):
        raise TierValueError("the value holds another block's tokens")
    off += 8 * t
    half = (len(value) - DIGEST_BYTES - off) // 2
    payload = torch.frombuffer(bytearray(view[off:off + 2 * half]), dtype=torch.uint8)  # (2 * half,)
    kv = payload.view(dtype).view(2, *shape)  # (2, L, Hkv, T, D)
    return kv[0], kv[1]
