"""Projection weights stored in the layout that runs fastest for decode on the backend.

Three kernel families, chosen per model by `kernels=`:
- "torch": plain torch matmuls. A weight with at least as many outputs as inputs is stored
  input-major (in, out) and applied as `x @ W` (for decode on this CPU 1.2-1.8x faster than
  `F.linear` on (out, in)); a weight with fewer outputs keeps (out, in) and uses `F.linear`,
  which is faster there. Both are the kernels `transformers` uses, so fp32 logits agree
  with it to the last bit on a full forward.
- "onednn": on CPU, the weight is reordered once into oneDNN's blocked layout and applied
  with `_linear_pointwise`: decode streams weights 1.5-2.5x faster in bf16 (and ~10% in
  fp32), at the price of a different fp32 summation order (~1e-4 on the real model's logits).
- "native": fp32 on CPU with the native kernels built (`kvcache.native`). Weights stay
  (out, in). Up to `native.SKINNY_ROWS` (16) rows (decode batches, short prompt chunks) go
  through the native skinny matmul, whose threads stream their share of the weight once per
  four rows (~27 GB/s here, against 11-23 GB/s for torch's matrix-vector products: a decode
  step's matmuls take ~21 ms instead of ~30, a batch of 8 rows ~35 ms instead of ~67); more
  rows (prefill) use `F.linear`, exactly as `transformers` does, so fp32 logits of a full
  forward still agree with it to the last bit. Decode sums in another order (~5e-5).
"auto" picks onednn for bf16 on a CPU that supports it, native for fp32 where the native
kernels are built, torch otherwise (CUDA included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvcache.native import ops as native

KERNELS = ("auto", "torch", "onednn", "native")


def onednn_available(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether oneDNN packed linear layers can run for this dtype on this device."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def slow_dtype_reason(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why this dtype would run slowly on this device, or None: bf16 on a CPU whose oneDNN has
    no bf16 kernels (no AVX-512 BF16 or AMX; e.g. AMD Zen 2/3), where torch's bf16 matmuls
    run ~16 GFLOP/s against ~90 in fp32 on a 2-core Zen 3."""
    if device.type == "cpu" and dtype == torch.bfloat16 and not onednn_available(dtype, device):
        return ("this CPU has no bfloat16 matmul hardware, so bfloat16 runs several times slower than "
                "float32 here; use dtype='float32'.")
    return None


def resolve_kernels(kernels: str, dtype: torch.dtype, device: torch.device) -> str:
    """The concrete kernel family ("torch" or "onednn") for a requested one."""
    from kvcache.errors import KVCacheError

    if kernels not in KERNELS:
        raise KVCacheError(f"kernels must be one of {', '.join(KERNELS)}, got '{kernels}'.")
    native_ok = dtype == torch.float32 and native.supports(dtype, device)
    if kernels == "auto":
        if dtype == torch.bfloat16 and onednn_available(dtype, device):
            return "onednn"
        return "native" if native_ok else "torch"
    if kernels == "onednn" and not onednn_available(dtype, device):
        raise KVCacheError(f"oneDNN kernels are not available for {dtype} on {device}; use kernels='torch'.")
    if kernels == "native" and not native_ok:
        raise KVCacheError(f"native kernels need float32 on a CPU with a C compiler, not {dtype} on {device}; "
                           "use kernels='torch'.")
    return kernels


class Linear:
    """y = x @ W.T + b for a weight given as (out, in); x is (..., in)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, kernels: str = "torch"):
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.kind = kernels
        if kernels == "onednn":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
        elif kernels == "native":
            self.weight = weight.contiguous()  # (out, in)
        elif self.out_features >= self.in_features:
            self.kind = "matmul"
            self.weight = weight.t().contiguous()  # (in, out)
        else:
            self.kind = "linear"
            self.weight = weight.contiguous()  # (out, in)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if self.kind == "native":
            if x.numel() <= native.SKINNY_ROWS * self.in_features:
                y = native.skinny_matmul(x, self.weight)
                return y if self.bias is None else y + self.bias
            return F.linear(x, self.weight, self.bias)
        if self.kind == "linear":
            return F.linear(x, self.weight, self.bias)
        y = x @ self.weight
        return y if self.bias is None else y + self.bias

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def nbytes(self) -> int:
        """Bytes of the weight as held."""
        return self.numel * self.weight.element_size()
