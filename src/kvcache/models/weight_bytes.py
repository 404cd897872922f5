"""Exact bytes a model's weights take as `LlamaModel` holds them, per quantization, without loading them.

From the architecture numbers alone (a config or a preset) for "none", "int8" and "int4", and from a
GGUF's tensor index (`gguf_weights.tensor_index`, the header only) for "gguf". The count equals
`LlamaModel.weight_bytes` of the loaded model:

- "none": every matrix and norm in the float dtype; the output head is a matrix of its own beside
  the token embedding, tied or not.
- "int8": the layers' matrices in "i8" tiles (`weight_packing`), the embedding and an untied head
  in their `table_format` ("q8" blocks); a tied head reads the embedding's table.
- "int4": the same with the layers' matrices in "q4" tiles (their inputs must divide into groups
  of 32).
- "gguf": Q8_0 / Q4_0 / Q4_1 tensors in "q8" / "q4" tiles, float tensors in the float dtype; a
  float embedding also feeds a float head of its own when the file has no `output.weight`.
Norms are in the float dtype under every quantization. Biases are not counted (as in
`LlamaModel.weight_bytes`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from kvcache.errors import KVCacheError
from kvcache.models.weight_packing import BLOCK, TILE, table_format, tile_bytes

#: The quantizations a weight count is given for.
WEIGHT_QUANTIZATIONS = ("none", "int8", "int4", "gguf")


class WeightShape(Protocol):
    """The numbers a weight count needs (`LlamaConfig` and `cache.spec.ModelShape` both have them)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int | None
    vocab_size: int | None
    tie_word_embeddings: bool | None


def packed_bytes(fmt: str, rows: int, cols: int) -> int:
    """Bytes of a (rows, cols) matrix in `fmt` tiles: whole tiles of 16 rows, blocks of 32 inputs."""
    return -(-rows // TILE) * tile_bytes(fmt, -(-cols // BLOCK))


def layer_matrices(shape: WeightShape) -> list[tuple[str, int, int]]:
    """(name, outputs, inputs) of one decoder layer's matrices."""
    h, q, kv, i = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim, \
        shape.intermediate_size
    return [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q),
            ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]


def _check_float_bytes(float_bytes: int) -> None:
    if float_bytes not in (2, 4):
        raise KVCacheError(f"float_bytes must be 2 (bf16/fp16) or 4 (fp32), got {float_bytes!r}.")


def shape_weight_bytes(shape: WeightShape, quantization: str, float_bytes: int = 2) -> int:
    """Bytes of the weights under "none", "int8" or "int4", float parts `float_bytes` wide."""
    _check_float_bytes(float_bytes)
    if quantization not in ("none", "int8", "int4"):
        raise KVCacheError(f"A model's shape gives the weight bytes of none, int8 or int4, not '{quantization}'.")
    if not shape.vocab_size or not shape.intermediate_size:
        raise KVCacheError("The weight bytes need the model's vocab_size and intermediate_size, which its "
                           "config does not give.")
    h, v = shape.hidden_size, shape.vocab_size
    norms = (2 * shape.num_layers + 1) * h * float_bytes
    matrices = layer_matrices(shape)
    if quantization == "none":
        layer = sum(n * k for _, n, k in matrices) * float_bytes
        return norms + shape.num_layers * layer + 2 * v * h * float_bytes  # embedding and head
    if quantization == "int4":
        for name, n, k in matrices:
            if k % BLOCK:
                raise KVCacheError(f"int4 weights quantize groups of {BLOCK} inputs, but {name} has {k} inputs.")
    fmt = "q4" if quantization == "int4" else "i8"
    layer = sum(packed_bytes(fmt, n, k) for _, n, k in matrices)
    table = packed_bytes(table_format(h), v, h)  # the embedding, and an untied head
    return norms + shape.num_layers * layer + table * (1 if shape.tie_word_embeddings else 2)


def gguf_weight_bytes(path: str | Path, float_bytes: int = 2) -> int:
    """Bytes of a GGUF's weights under "gguf", from its tensor types and shapes (the header only)."""
    from kvcache.models.gguf_file import FLOAT_TYPES, KEPT_FORMATS, hf_tensor_name, tensor_index

    _check_float_bytes(float_bytes)
    path = Path(path)
    total, embed_float, has_output = 0, 0, False
    for t in tensor_index(path):
        hf = hf_tensor_name(t.name)
        if hf is None or not hf.endswith(".weight"):
            continue
        has_output |= t.name == "output.weight"
        numel = 1
        for d in t.shape:
            numel *= d
        if t.type_name in KEPT_FORMATS:
            cols = t.shape[-1]
            total += packed_bytes(KEPT_FORMATS[t.type_name], numel // cols, cols)
        elif t.type_name in FLOAT_TYPES:
            total += numel * float_bytes
            if t.name == "token_embd.weight":
                embed_float = numel * float_bytes
        else:
            raise KVCacheError(f"{path.name} stores {t.name} as {t.type_name}, which quantization='gguf' "
                               "does not keep.")
    return total + (0 if has_output else embed_float)  # a float tied head is a matrix of its own


def weight_bytes(shape: WeightShape, quantization: str, float_bytes: int = 2, gguf: str | Path | None = None) -> int:
    """Bytes the weights take under `quantization` ("none", "int8", "int4" from the shape; "gguf"
    from the GGUF file `gguf`). Raises `KVCacheError` with the reason where the count does not apply."""
    if quantization == "gguf":
        if gguf is None:
            raise KVCacheError("quantization='gguf' keeps a GGUF file's own formats, and this model is not a GGUF "
                               "file.")
        return gguf_weight_bytes(gguf, float_bytes)
    if quantization not in WEIGHT_QUANTIZATIONS:
        raise KVCacheError(f"quantization must be one of {', '.join(WEIGHT_QUANTIZATIONS)}, got '{quantization}'.")
    return shape_weight_bytes(shape, quantization, float_bytes)
