"""A GGUF's weights as the native decode loop reads them: packed tiles in numpy arrays and the
layer table of their addresses (`native/decode_layers.c`). No torch."""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvcache.errors import ModelFormatError
from kvcache.models.config import LlamaConfig
from kvcache.models.gguf_file import (GGUF_BLOCK_BYTES, TensorEntry, block_tiles, check_rope_factors, read_tensor,
                                      release_pages, rope_heads, tensor_index, unpermute_rope_rows)
from kvcache.models.packed_tiles import FORMAT_CODES, TILE
from kvcache.native.signatures import MAX_GROUP, MAX_HEAD_DIM, attention_fits, layer_row

_ENGINE = "run it with the engine (kvcache without --solo)"


@dataclass
class PackedMatrix:
    """One matrix in the kernels' tiles: `tiles` (ceil(N/16), tile bytes) uint8."""

    fmt: str  # "q4" | "q8"
    out_features: int
    in_features: int
    tiles: np.ndarray

    @property
    def code(self) -> int:
        return FORMAT_CODES[self.fmt]

    @property
    def address(self) -> int:
        return self.tiles.ctypes.data


def _stacked(parts: list[PackedMatrix], what: str) -> PackedMatrix:
    """Matrices of one format stacked along their outputs (Q, K, V; gate, up) as one: their tiles
    back to back, which needs every part but the last to fill whole tiles."""
    if len({p.fmt for p in parts}) != 1 or any(p.out_features % TILE for p in parts[:-1]):
        raise ModelFormatError(f"the solo runtime fuses {what} into one packed matrix, which needs one format and "
                               f"rows in multiples of {TILE}; {_ENGINE}.")
    return PackedMatrix(parts[0].fmt, sum(p.out_features for p in parts), parts[0].in_features,
                        np.concatenate([p.tiles for p in parts]))


@dataclass
class SoloWeights:
    """Every weight of a model: the layer table (L, dl_fields) int64 points into `keep`."""

    config: LlamaConfig
    embed: PackedMatrix  # (V, H): the token embedding, rows dequantized on lookup
    head: PackedMatrix  # (V, H): the output head (the embedding itself when tied)
    final_norm: np.ndarray  # (H,) float32
    layers: np.ndarray  # (L, fields) int64
    keep: list  # the arrays the table's addresses point into

    @property
    def nbytes(self) -> int:
        """Bytes of the weights held (packed matrices and norms; a tied head is the embedding)."""
        held = [*self.keep, self.final_norm, self.embed.tiles, self.head.tiles]
        return sum({id(a): a.nbytes for a in held}.values())

    @property
    def bytes_read_per_token(self) -> int:
        """Bytes one decode step streams: every layer's matrices and norms, the final norm and the
        head (the embedding's one row not counted, unless it is the head)."""
        return sum(a.nbytes for a in self.keep) + self.final_norm.nbytes + self.head.tiles.nbytes

    @classmethod
    def load(cls, path: Path, config: LlamaConfig, layer_fields: int) -> "SoloWeights":
        """Read and repack the GGUF at `path` (one tensor at a time: the file's pages are handed
        back after each), checking that the runtime can run every tensor."""
        c = config
        if c.attention_bias:
            raise ModelFormatError(f"{path.name} has attention biases, which the solo runtime does not add; {_ENGINE}.")
        if not attention_fits(c.head_dim, c.num_heads, c.num_kv_heads):
            raise ModelFormatError(f"{path.name} has heads of {c.head_dim} and {c.num_heads // c.num_kv_heads} query "
                                   f"heads per KV head; the native attention takes at most {MAX_HEAD_DIM} and "
                                   f"{MAX_GROUP}; {_ENGINE}.")
        index = {t.name: t for t in tensor_index(path)}
        check_rope_factors(path, index)
        scaled = (c.rope_scaling or {}).get("rope_type", (c.rope_scaling or {}).get("type", "default"))
        if scaled not in (None, "default"):
            raise ModelFormatError(f"{path.name} scales its RoPE, which the solo runtime does not; {_ENGINE}.")
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = np.frombuffer(mapped, dtype=np.uint8)

        def entry(name: str) -> TensorEntry:
            if name not in index:
                raise ModelFormatError(f"{path.name} has no tensor {name}.")
            return index[name]

        def matrix(name: str, shape: tuple[int, int]) -> PackedMatrix:
            t = entry(name)
            if t.type_name not in GGUF_BLOCK_BYTES:
                raise ModelFormatError(f"{path.name} stores {name} as {t.type_name}; the solo runtime runs "
                                       f"{', '.join(GGUF_BLOCK_BYTES)} matrices only; {_ENGINE}.")
            if tuple(t.shape) != shape:
                raise ModelFormatError(f"{path.name} holds {name} as {tuple(t.shape)}, but its config makes it {shape}.")
            try:
                raw = read_tensor(buf, t)
                heads = rope_heads(name, c.num_heads, c.num_kv_heads)
                if heads:
                    raw = unpermute_rope_rows(raw, heads)
                fmt, tiles = block_tiles(raw, t.type_name)
            except ValueError as exc:  # bytes missing or misshapen: a truncated or damaged file
                raise ModelFormatError(f"{path} has an unreadable tensor {name} ({exc}).") from None
            release_pages(mapped, t.offset, raw.nbytes)  # repacked into a copy
            return PackedMatrix(fmt, t.shape[0], t.shape[1], tiles)

        def vector(name: str, size: int) -> np.ndarray:
            t = entry(name)
            if t.type_name not in ("F32", "F16", "BF16") or tuple(t.shape) != (size,):
                raise ModelFormatError(f"{path.name} stores {name} as {t.type_name} {tuple(t.shape)}, not {size} "
                                       "float values.")
            try:
                return np.ascontiguousarray(read_tensor(buf, t), dtype=np.float32).reshape(-1)
            except ValueError as exc:
                raise ModelFormatError(f"{path} has an unreadable tensor {name} ({exc}).") from None

        h, d, q, kv, inter = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.intermediate_size
        rows, keep = [], []
        for i in range(c.num_layers):
            b = f"blk.{i}."
            qkv = _stacked([matrix(b + "attn_q.weight", (q * d, h)), matrix(b + "attn_k.weight", (kv * d, h)),
                            matrix(b + "attn_v.weight", (kv * d, h))], "Q, K and V")
            o = matrix(b + "attn_output.weight", (h, q * d))
            gu = _stacked([matrix(b + "ffn_gate.weight", (inter, h)), matrix(b + "ffn_up.weight", (inter, h))],
                          "gate and up")
            down = matrix(b + "ffn_down.weight", (h, inter))
            attn_norm, mlp_norm = vector(b + "attn_norm.weight", h), vector(b + "ffn_norm.weight", h)
            keep += [attn_norm, mlp_norm, qkv.tiles, o.tiles, gu.tiles, down.tiles]
            rows.append(layer_row(attn_norm.ctypes.data, (qkv.address, qkv.code), (o.address, o.code),
                                  mlp_norm.ctypes.data, (gu.address, gu.code), (down.address, down.code),
                                  1))  # one activation digit, as quantization="gguf" runs
        embed = matrix("token_embd.weight", (c.vocab_size, h))
        head = matrix("output.weight", (c.vocab_size, h)) if "output.weight" in index else embed
        final_norm = vector("output_norm.weight", h)
        table = np.array(rows, dtype=np.int64).reshape(c.num_layers, -1)  # (L, fields)
        if table.shape[1] != layer_fields:
            raise RuntimeError(f"decode_layers.c takes {layer_fields} fields per layer, not {table.shape[1]}.")
        return cls(c, embed, head, final_norm, table, keep)

