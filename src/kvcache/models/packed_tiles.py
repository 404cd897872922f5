"""The kernels' tile layout (`native/qlinear.c`) written with numpy, no torch: shared by the
model's `weight_packing` (which wraps the bytes in torch tensors) and the torch-free
single-user runtime (`kvcache.solo`).

A matrix (N outputs, K inputs) is cut into tiles of 16 output rows; a tile holds its blocks of 32
inputs one after another, each block's codes interleaved so that one 64-byte load gives 4
consecutive inputs of all 16 outputs (output j at bytes 4j..4j+3), then the block's fp16 values
per output (output j at bytes 2j, 2j+1).
"""

from __future__ import annotations

import numpy as np

TILE, BLOCK = 16, 32
#: Rows quantized or repacked at a time (a whole number of tiles): temporaries stay ~16 MB whatever the matrix.
ROWS_AT_ONCE = 4096
BLOCK_BYTES = {"q4": 320, "q8": 544, "i8": 512}
FORMAT_CODES = {"q4": 0, "q8": 1, "i8": 2}  # the kernels' QL_* numbers


def tiles_by_row_blocks(n: int, rows_tiles) -> np.ndarray:
    """The tiles (ceil(n/16), tile bytes) of an n-row matrix made `ROWS_AT_ONCE` rows at a time:
    `rows_tiles(lo, hi)` gives the tiles of rows lo..hi, written straight into the one result, so
    only one block's temporaries are ever resident beside it."""
    step = max(TILE, ROWS_AT_ONCE // TILE * TILE)
    out = None
    for lo in range(0, n, step):
        part = rows_tiles(lo, min(n, lo + step))
        if out is None:
            out = np.empty((-(-n // TILE), part.shape[1]), np.uint8)
        out[lo // TILE: lo // TILE + part.shape[0]] = part
    return out


def pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """a with zero rows appended up to `rows` (a itself where it has them)."""
    if a.shape[0] == rows:
        return a
    return np.concatenate([a, np.zeros((rows - a.shape[0],) + a.shape[1:], a.dtype)])


def _values_into(out: np.ndarray, s: np.ndarray, tiles: int, nb: int) -> None:
    """fp16 (N, nb) per-output-and-block values into out (T, nb, 32) bytes, output j at 2j."""
    s = pad_rows(s.astype(np.float16), tiles * TILE).reshape(tiles, TILE, nb)  # (T, 16, nb)
    out.view(np.float16)[...] = s.transpose(0, 2, 1)  # (T, nb, 16)


def _int8_blocks_into(out: np.ndarray, codes: np.ndarray, tiles: int, nb: int) -> None:
    """int8 codes (N, nb*32) into out (T, nb*512) bytes: each block's codes 4 inputs of all 16
    outputs at a time (output j at bytes 4j..4j+3)."""
    c = pad_rows(np.ascontiguousarray(codes).view(np.int32), tiles * TILE).reshape(tiles, TILE, nb, 8)  # (T, j, b, c)
    out.view(np.int32).reshape(tiles, nb, 8, TILE)[...] = c.transpose(0, 2, 3, 1)


def q4_tiles(byte: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Chunk bytes (N, nb, 4, 4) uint8 (chunk c, byte e: inputs 8c+e low nibble, 8c+4+e high) and
    d, m (N, nb) fp16 -> "q4" tiles (ceil(N/16), nb * 320) uint8."""
    n, nb = byte.shape[0], byte.shape[1]
    tiles = -(-n // TILE)
    out = np.empty((tiles, nb, 320), np.uint8)
    b = pad_rows(np.ascontiguousarray(byte), tiles * TILE).view(np.int32).reshape(tiles, TILE, nb, 4)  # (T, j, b, c)
    out[:, :, :256].view(np.int32).reshape(tiles, nb, 4, TILE)[...] = b.transpose(0, 2, 3, 1)  # 4 bytes a move
    _values_into(out[:, :, 256:288], d, tiles, nb)
    _values_into(out[:, :, 288:], m, tiles, nb)
    return out.reshape(tiles, nb * 320)


def q8_tiles(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """codes (N, K) int8 and d (N, K/32) fp16 -> "q8" tiles (ceil(N/16), K/32 * 544) uint8."""
    n, k = codes.shape
    nb, tiles = k // BLOCK, -(-n // TILE)
    out = np.empty((tiles, nb, 544), np.uint8)
    _int8_blocks_into(out[:, :, :512], codes, tiles, nb)
    _values_into(out[:, :, 512:], d, tiles, nb)
    return out.reshape(tiles, nb * 544)


def i8_tiles(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """codes (N, Kp) int8 (Kp a multiple of 32) and scale (N,) fp32 -> "i8" tiles
    (ceil(N/16), Kp/32 * 512 + 64) uint8: the codes' blocks, then the tile's 16 fp32 scales."""
    n, kp = codes.shape
    nb, tiles = kp // BLOCK, -(-n // TILE)
    out = np.empty((tiles, nb * 512 + 64), np.uint8)
    _int8_blocks_into(out[:, : nb * 512], codes, tiles, nb)
    out[:, nb * 512:].view(np.float32)[...] = pad_rows(scale.astype(np.float32), tiles * TILE).reshape(tiles, TILE)
    return out
