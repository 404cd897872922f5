"""Weight matrices packed for the quantized linear kernels (`native/qlinear.c`).

A matrix (N outputs, K inputs) is cut into tiles of 16 output rows; a tile holds its blocks
of 32 inputs one after another, each block's codes interleaved so that one 64-byte load
gives 4 consecutive inputs of all 16 outputs (output j at bytes 4j..4j+3). Three formats:

- "q4": 4-bit codes q, fp16 scale d and minimum m per output and block, w = d * q + m.
  GGUF Q4_1 as stored, GGUF Q4_0 (w = d * (q - 8): m = -8d, exact in fp16), and our int4.
- "q8": signed 8-bit codes, fp16 scale per output and block, w = d * q (GGUF Q8_0).
- "i8": signed 8-bit codes, one fp32 scale per output row (our int8, symmetric).

Rows past N (to fill the last tile) and inputs past K (int8 only) hold zero codes and scales.
`dequantize` here is the torch reference of the same arithmetic (the kernels' tests use it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache.errors import KVCacheError
from kvcache.models.packed_tiles import (BLOCK, BLOCK_BYTES, FORMAT_CODES, TILE, i8_tiles, q4_tiles, q8_tiles,
                                        tiles_by_row_blocks)

__all__ = ["BLOCK", "BLOCK_BYTES", "FORMAT_CODES", "TILE", "PackedWeight"]


@dataclass
class PackedWeight:
    """One packed matrix: `data` (tiles, tile_bytes) uint8 in `fmt`'s layout."""

    fmt: str  # "q4" | "q8" | "i8"
    out_features: int
    in_features: int
    data: torch.Tensor  # (ceil(N/16), tile_bytes) uint8
    source: str  # what it was packed from: "Q4_1", "Q4_0", "Q8_0", "int4", "int8"

    @property
    def blocks(self) -> int:
        return -(-self.in_features // BLOCK)

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def tile_bytes(fmt: str, blocks: int) -> int:
    """Bytes of one tile of `blocks` blocks."""
    return blocks * BLOCK_BYTES[fmt] + (64 if fmt == "i8" else 0)


def q4_bytes(codes: torch.Tensor) -> torch.Tensor:
    """codes (N, K) in 0..15 -> (N, K/32, 4, 4) bytes: chunk c, byte e holds inputs 8c+e (low
    nibble) and 8c+4+e (high nibble) of its block."""
    c = codes.to(torch.uint8).view(codes.shape[0], -1, 4, 2, 4)  # (N, nb, chunk, half, e)
    return c[:, :, :, 0] | (c[:, :, :, 1] << 4)


def pack_q4_bytes(byte: torch.Tensor, d: torch.Tensor, m: torch.Tensor, source: str) -> PackedWeight:
    """Chunk bytes (N, nb, 4, 4) (`q4_bytes`) and d, m (N, nb) fp16 -> "q4" tiles (`packed_tiles.q4_tiles`)."""
    n, nb = byte.shape[0], byte.shape[1]
    return PackedWeight("q4", n, nb * BLOCK, torch.from_numpy(q4_tiles(byte.numpy(), d.numpy(), m.numpy())), source)


def pack_q4(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, source: str) -> PackedWeight:
    """codes (N, K) uint8 in 0..15 and d, m (N, K/32) fp16 -> "q4" tiles."""
    return pack_q4_bytes(q4_bytes(codes), d, m, source)


def pack_q8(codes: torch.Tensor, d: torch.Tensor, source: str) -> PackedWeight:
    """codes (N, K) int8 and d (N, K/32) fp16 -> "q8" tiles (`packed_tiles.q8_tiles`)."""
    return PackedWeight("q8", codes.shape[0], codes.shape[1], torch.from_numpy(q8_tiles(codes.numpy(), d.numpy())),
                        source)


def pack_i8(codes: torch.Tensor, scale: torch.Tensor, in_features: int, source: str = "int8") -> PackedWeight:
    """codes (N, Kp) int8 with Kp = K rounded up to 32 (zeros past K) and scale (N,) fp32 -> "i8" tiles."""
    data = i8_tiles(codes.contiguous().numpy(), scale.to(torch.float32).numpy())
    return PackedWeight("i8", codes.shape[0], in_features, torch.from_numpy(data), source)


def _packed_by_row_blocks(n: int, pack_rows) -> PackedWeight:
    """A matrix of n rows packed a block of rows at a time (`packed_tiles.tiles_by_row_blocks`):
    `pack_rows(lo, hi)` quantizes and packs rows lo..hi, so only one block's float values and
    codes are ever resident beside the result."""
    first = []  # the first block's PackedWeight: the matrix's format and source

    def rows_tiles(lo: int, hi: int):
        part = pack_rows(lo, hi)
        if not first:
            first.append(part)
        return part.data.numpy()

    tiles = tiles_by_row_blocks(n, rows_tiles)
    return PackedWeight(first[0].fmt, n, first[0].in_features, torch.from_numpy(tiles), first[0].source)


def quantize_int8(w: torch.Tensor) -> PackedWeight:
    """Symmetric int8 per output row: scale = max|w| / 127, codes = round(w / scale)."""
    n, k = w.shape
    kp = -(-k // BLOCK) * BLOCK

    def rows(lo: int, hi: int) -> PackedWeight:
        part = w[lo:hi].float()  # (rows, K)
        s = part.abs().amax(1) / 127  # (rows,)
        inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))
        codes = torch.zeros(hi - lo, kp, dtype=torch.int8)
        codes[:, :k] = (part * inv[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return pack_i8(codes, s, k)

    return _packed_by_row_blocks(n, rows)


def quantize_q8_blocks(w: torch.Tensor) -> PackedWeight:
    """Symmetric int8 per output row and block of 32 inputs ("q8", GGUF Q8_0's arithmetic):
    fp16 scale d = max|w| / 127 of the block, codes = round(w / d)."""
    n, k = w.shape
    if k % BLOCK:
        raise KVCacheError(f"q8 blocks hold {BLOCK} inputs, but the matrix has {k}.")
    nb = k // BLOCK

    def rows(lo: int, hi: int) -> PackedWeight:
        g = w[lo:hi].float().reshape(-1, nb, BLOCK)  # (rows, nb, 32)
        d = (g.abs().amax(-1) / 127).half()  # (rows, nb)
        df = d.float()[..., None]
        q = torch.where(df > 0, (g / df).round(), torch.zeros_like(g)).clamp_(-127, 127)
        return pack_q8(q.to(torch.int8).reshape(-1, k), d, "q8")

    return _packed_by_row_blocks(n, rows)


def table_format(in_features: int) -> str:
    """The packing of a token embedding / output head quantized at load (under "int8" and "int4"):
    8 bits with a scale per block of 32 inputs ("q8", as quantized GGUFs keep them), or one scale
    per row ("i8") where the rows do not divide into blocks. Measured on the default model, the
    per-block scales take about a third off the divergence from float weights of both
    (`benchmarks/bench_quantization_error.py`)."""
    return "q8" if in_features % BLOCK == 0 else "i8"


def quantize_table(w: torch.Tensor) -> PackedWeight:
    """An embedding / output head (N, K) packed in its `table_format`."""
    return quantize_q8_blocks(w) if table_format(w.shape[1]) == "q8" else quantize_int8(w)


def quantize_int4(w: torch.Tensor, name: str = "a matrix") -> PackedWeight:
    """Asymmetric int4 per output row and group of 32 inputs: fp16 scale d = (max - min) / 15 and
    minimum m, codes = round((w - m) / d) in 0..15."""
    n, k = w.shape
    if k % BLOCK:
        raise KVCacheError(f"int4 weights quantize groups of {BLOCK} inputs, but {name} has {k} inputs; "
                           "use quantization='int8'.")
    nb = k // BLOCK

    def rows(lo: int, hi: int) -> PackedWeight:
        g = w[lo:hi].float().reshape(-1, nb, BLOCK)  # (rows, nb, 32)
        lo_v, hi_v = g.amin(-1), g.amax(-1)  # (rows, nb)
        d, m = ((hi_v - lo_v) / 15).half(), lo_v.half()
        df, mf = d.float()[..., None], m.float()[..., None]
        q = torch.where(df > 0, ((g - mf) / df).round(), torch.zeros_like(g)).clamp_(0, 15)
        return pack_q4(q.to(torch.uint8).reshape(-1, k), d, m, "int4")

    return _packed_by_row_blocks(n, rows)


def _codes_q4(data: torch.Tensor, tiles: int, nb: int) -> torch.Tensor:
    """(T*16, nb*32) codes of "q4" tiles."""
    byte = data.view(tiles, nb, 320)[:, :, :256].reshape(tiles, nb, 4, TILE, 4)  # (T, b, chunk, j, e)
    q = torch.stack([byte & 15, byte >> 4], 3)  # (T, b, chunk, half, j, e)
    return q.permute(0, 4, 1, 2, 3, 5).reshape(tiles * TILE, nb * BLOCK)


def _per_block(data: torch.Tensor, tiles: int, nb: int, block: int, start: int) -> torch.Tensor:
    """(T*16, nb) fp32 of the fp16 per-output values at `start` of each block."""
    s = data.view(tiles, nb, block)[:, :, start:start + 32].contiguous().view(torch.float16)  # (T, nb, 16)
    return s.permute(0, 2, 1).reshape(tiles * TILE, nb).float()


def dequantize(p: PackedWeight) -> torch.Tensor:
    """The packed matrix as fp32 (N, K), in torch (the reference of the kernels' arithmetic)."""
    tiles, nb = p.data.shape[0], p.blocks
    if p.fmt == "q4":
        q = _codes_q4(p.data, tiles, nb).float()  # (T*16, nb*32)
        d = _per_block(p.data, tiles, nb, 320, 256).repeat_interleave(BLOCK, 1)
        m = _per_block(p.data, tiles, nb, 320, 288).repeat_interleave(BLOCK, 1)
        w = d * q + m
    else:
        body = p.data[:, : nb * 512] if p.fmt == "i8" else p.data.view(tiles, nb, 544)[:, :, :512]
        q = body.reshape(tiles, nb, 8, TILE, 4).view(torch.int8).permute(0, 3, 1, 2, 4)
        q = q.reshape(tiles * TILE, nb * BLOCK).float()  # (T*16, nb*32)
        if p.fmt == "q8":
            w = q * _per_block(p.data, tiles, nb, 544, 512).repeat_interleave(BLOCK, 1)
        else:
            scale = p.data[:, nb * 512:].contiguous().view(torch.float32).reshape(-1, 1)  # (T*16, 1)
            w = q * scale
    return w[: p.out_features, : p.in_features]
