"""Every decoder layer of a decode step in one native call (`native/decode_layers.c`).

At batch 1 a decode step of a small quantized model streams its packed weights in a few
milliseconds, and the dozen Python-level operations per layer around them (norms, RoPE,
the cache write, attention, residual adds, each a torch or ctypes dispatch) cost about as
much again. `FusedDecodeLayers` runs the same kernels in the same order in one C loop, so
its hidden state is bit-identical to the layer-by-layer path (`tests/integration/test_fused_decode.py`).

It runs where every projection is one packed matrix without bias, all with one activation
digit count (`quantization` gguf, int8 or int4 with the native kernels built), and the KV
store hands the step its plain float blocks (`StepKV.decode_blocks`: the paged engine's decode steps without a policy
that writes or attends itself); everything else takes the layer-by-layer path.
"""

from __future__ import annotations

import torch

from kvcache.models.config import LlamaConfig
from kvcache.models.quantized_linear import QuantizedLinear
from kvcache.models.step import DecodeBlocks
from kvcache.models.weight_packing import FORMAT_CODES, PackedWeight
from kvcache.native import qlinear
from kvcache.native.signatures import layer_row


def _packed(lin) -> PackedWeight | None:
    """The one packed matrix behind a projection, or None (float, several parts, a bias)."""
    if not isinstance(lin, QuantizedLinear) or lin.bias is not None or len(lin.parts) != 1:
        return None
    p = lin.parts[0]
    return p if isinstance(p, PackedWeight) else None


class FusedDecodeLayers:
    """The layer table (weights' addresses and formats) of one model, and the call that runs it."""

    def __init__(self, kernel: qlinear.QLinearKernels, table: torch.Tensor, config: LlamaConfig,
                 keep: list):
        self.kernel, self.table, self.config = kernel, table, config
        self._keep = keep  # the tensors the table points into

    @classmethod
    def build(cls, config: LlamaConfig, layers: list) -> "FusedDecodeLayers | None":
        """The fused call for these `LayerWeights`, or None where a layer is not all packed matrices
        or the native library is not built."""
        mats_of = [[_packed(lin) for lin in (lw.qkv, lw.o, lw.gate_up, lw.down)] for lw in layers]
        kernel = qlinear.kernels() if all(m is not None for mats in mats_of for m in mats) else None
        if kernel is None:
            return None
        rows, keep = [], []
        digits = {lin.activation_digits for lw in layers for lin in lw.linears()}
        if len(digits) != 1:  # the table holds one digit count per layer; mixed models run layer by layer
            return None
        for lw, mats in zip(layers, mats_of):
            qkv, o, gu, down = mats
            keep += [lw.attn_norm, lw.mlp_norm, *(m.data for m in mats)]
            rows.append(layer_row(lw.attn_norm.data_ptr(), (qkv.data.data_ptr(), FORMAT_CODES[qkv.fmt]),
                                  (o.data.data_ptr(), FORMAT_CODES[o.fmt]), lw.mlp_norm.data_ptr(),
                                  (gu.data.data_ptr(), FORMAT_CODES[gu.fmt]),
                                  (down.data.data_ptr(), FORMAT_CODES[down.fmt]), *digits))
        table = torch.tensor(rows, dtype=torch.int64)  # (L, fields)
        if table.shape[1] != kernel.layer_fields:
            raise RuntimeError(f"decode_layers.c takes {kernel.layer_fields} fields per layer, not {table.shape[1]}.")
        return cls(kernel, table, config, keep)

    def __call__(self, x: torch.Tensor, kv: DecodeBlocks, cos: torch.Tensor, sin: torch.Tensor,
                 pos: torch.Tensor) -> torch.Tensor:
        """x (B, 1, H) after the embedding -> the hidden state after the last layer (B, 1, H),
        each row's new K/V written to its slot. cos, sin: the RoPE tables; pos (B,) int64."""
        c = self.config
        x = x.reshape(x.shape[0], c.hidden_size).clone()  # (B, H), updated in place
        self.kernel.decode_layers(x, self.table, (c.num_heads, c.num_kv_heads, c.head_dim), c.intermediate_size,
                                  c.rms_norm_eps, cos, sin, pos, kv.k, kv.v, kv.write_slots, kv.table, kv.lo,
                                  kv.hi, kv.block_size)
        return x[:, None]  # (B, 1, H)
