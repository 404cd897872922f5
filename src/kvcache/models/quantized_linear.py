"""A linear layer computed from packed weight codes, behind `Linear`'s call interface.

Every call runs the native kernel (`native/qlinear.c`): each row's activations are quantized
to int8 per block of 32 and multiplied with integer dot products (AVX-512 VNNI or AVX2), the
packed weight streamed once per call for all rows. `activation_digits=2` gives each row a
second int8 digit (its rounding residual): twice the integer work for activations carried
almost exactly, what our "int8" quantization takes to stay within its quality bound.

Prompts take the same kernel: measured on a 2-core AMD EPYC (Zen 4) in December 2026, one
thread, a Q4 3072 x 576 matrix with one activation digit, it beats oneDNN's bf16 matmul at
every row count (16 rows: 220 us against 292; 64: 791 against 1082; 200: 2434 against 3345),
and dequantizing the weight for a float matmul costs more than either (~1.8 ms); two digits
double the integer work (int8's prompts, benchmarks/README.md). Without the native library the
weight is dequantized in torch for each call and multiplied by `F.linear` (no float copy
outlives the call).

A fused projection (Q, K and V; gate and up) is a list of parts, each written into its
columns of the output; parts of one format are merged into one packed matrix. A part may
also be a float (out, in) tensor: a GGUF may store some matrices unquantized.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvcache.errors import KVCacheError
from kvcache.models.weight_packing import FORMAT_CODES, TILE, PackedWeight, dequantize
from kvcache.native import qlinear

def _merge(parts: list) -> list:
    """Consecutive packed parts of one format whose row counts fill whole tiles: one matrix."""
    out: list = []
    for p in parts:
        prev = out[-1] if out else None
        if (isinstance(p, PackedWeight) and isinstance(prev, PackedWeight) and prev.fmt == p.fmt
                and prev.in_features == p.in_features and prev.out_features % TILE == 0):
            source = prev.source if prev.source == p.source else f"{prev.source}+{p.source}"
            out[-1] = PackedWeight(p.fmt, prev.out_features + p.out_features, p.in_features,
                                   torch.cat([prev.data, p.data]), source)
        else:
            out.append(p)
    return out


class QuantizedLinear:
    """y = x @ W.T + b for W held as packed codes (parts stacked along the outputs); x (..., in)
    in `dtype` (float32 or bfloat16), quantized to `activation_digits` (1 or 2) int8 digits per row."""

    kind = "quantized"

    def __init__(self, parts: list[PackedWeight | torch.Tensor], bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32, activation_digits: int = 1):
        if dtype not in qlinear.IO_DTYPES:
            raise KVCacheError(f"quantized weights compute in float32 or bfloat16, not {dtype}.")
        if activation_digits not in (1, 2):
            raise ValueError(f"activation_digits is 1 or 2, not {activation_digits}.")
        self.activation_digits = activation_digits
        ins = {p.in_features if isinstance(p, PackedWeight) else p.shape[1] for p in parts}
        if len(ins) != 1:
            raise ValueError("every part of a fused projection must have the same inputs.")
        self.parts = [p if isinstance(p, PackedWeight) else p.to(dtype).contiguous() for p in _merge(parts)]
        self.in_features = ins.pop()
        self.out_features = sum(p.out_features if isinstance(p, PackedWeight) else p.shape[0] for p in self.parts)
        self.bias = bias
        self.dtype, self.device = dtype, torch.device("cpu")
        # per part: (packed bytes and kernel format code, or the float weight; columns)
        self._calls = [((p.data, FORMAT_CODES[p.fmt]) if isinstance(p, PackedWeight) else (p, None), col, n)
                       for p, col, n in self._columns()]

    @property
    def formats(self) -> str:
        """What the parts hold, e.g. "Q4_1" or "Q8_0+float"."""
        names = [p.source if isinstance(p, PackedWeight) else "float" for p in self.parts]
        return "+".join(dict.fromkeys(names))

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def nbytes(self) -> int:
        """Bytes of the weight as held (codes and scales)."""
        return sum(p.nbytes if isinstance(p, PackedWeight) else p.numel() * p.element_size() for p in self.parts)

    def _columns(self):
        col = 0
        for p in self.parts:
            n = p.out_features if isinstance(p, PackedWeight) else p.shape[0]
            yield p, col, n
            col += n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x2.dtype != self.dtype or not x2.is_contiguous():
            x2 = x2.to(self.dtype).contiguous()
        kern = qlinear.kernels()
        if kern is None:
            return F.linear(x2, self.dequantize(), self.bias).view(*lead, self.out_features)
        y = x2.new_empty(x2.shape[0], self.out_features)  # (M, N)
        for (w, code), col, n in self._calls:
            if code is None:
                y[:, col:col + n] = F.linear(x2, w)
            else:
                kern.matmul(x2, w, code, n, y, col, self.activation_digits)
        if self.bias is not None:
            y += self.bias
        return y.view(*lead, self.out_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a float (out, in) tensor in `dtype` (default the compute dtype)."""
        dtype = dtype or self.dtype
        kern = qlinear.kernels()
        mats = []
        for p, _, n in self._columns():
            if not isinstance(p, PackedWeight):
                mats.append(p.to(dtype))
            elif kern is not None and dtype in qlinear.IO_DTYPES:
                mats.append(kern.dequantize(p.data, FORMAT_CODES[p.fmt], self.in_features, n, None, dtype))
            else:
                mats.append(dequantize(p).to(dtype))
        return mats[0] if len(mats) == 1 else torch.cat(mats)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight in the compute dtype: (*ids.shape, in) (an embedding lookup)."""
        if len(self.parts) != 1:
            raise ValueError("rows() reads a single-part weight.")
        p = self.parts[0]
        if not isinstance(p, PackedWeight):
            return p[ids]
        kern = qlinear.kernels()
        if kern is None:
            return dequantize(p).to(self.dtype)[ids]
        return kern.dequantize(p.data, FORMAT_CODES[p.fmt], self.in_features, p.out_features, ids, self.dtype)
