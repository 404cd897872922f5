"""ctypes binding of the quantized-weight linear kernels (`qlinear.c`, built into the native library).

`kernels()` gives the binding of the library `build.load()` returns (None without one); tests
bind a library built for another vector target with `QLinearKernels(ctypes.CDLL(path))`.
"""

from __future__ import annotations

import ctypes

import torch

from kvcache.native.build import load

_P, _I, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
IO_DTYPES = (torch.float32, torch.bfloat16)
_bound: "QLinearKernels | None | bool" = False


class QLinearKernels:
    """The kernels of one loaded library."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.ql_matmul.argtypes = [_P, _P, _P, _I, _I, _I, _I, _C, _C]
        lib.ql_dequantize.argtypes = [_P, _C, _I, _I, _P, _I, _P, _C]
        lib.ql_quantize_activations.argtypes = [_P, _C, _I, _I, _P, _P, _P]
        lib.ql_tile_bytes.argtypes, lib.ql_tile_bytes.restype = [_C, _I], _I
        lib.ql_isa.argtypes, lib.ql_isa.restype = [], _C
        for fn in (lib.ql_matmul, lib.ql_dequantize, lib.ql_quantize_activations):
            fn.restype = None

    @property
    def isa(self) -> str:
        """The vector path this library runs: "avx512-vnni", "avx2" or "c"."""
        return {2: "avx512-vnni", 1: "avx2", 0: "c"}[self.lib.ql_isa()]

    def tile_bytes(self, fmt_code: int, blocks: int) -> int:
        return self.lib.ql_tile_bytes(fmt_code, blocks)

    def matmul(self, x: torch.Tensor, data: torch.Tensor, fmt_code: int, n: int, y: torch.Tensor, col: int = 0) -> None:
        """y[:, col:col+n] = x (M, K) @ W^T for W packed in `data`; x contiguous, y (M, ldy) with
        unit column stride, both of one dtype (fp32 or bf16)."""
        m, k = x.shape
        ptr = y.data_ptr() + col * y.element_size()
        self.lib.ql_matmul(x.data_ptr(), data.data_ptr(), ptr, m, k, n, y.stride(0), fmt_code,
                           int(x.dtype == torch.bfloat16))

    def dequantize(self, data: torch.Tensor, fmt_code: int, k: int, n: int, ids: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` (int64, any shape) of the packed matrix, or all n rows: (*ids.shape, K) / (N, K)."""
        if ids is None:
            out = torch.empty(n, k, dtype=dtype)
            self.lib.ql_dequantize(data.data_ptr(), fmt_code, k, n, None, 0, out.data_ptr(),
                                   int(dtype == torch.bfloat16))
            return out
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        out = torch.empty(flat.numel(), k, dtype=dtype)
        self.lib.ql_dequantize(data.data_ptr(), fmt_code, k, n, flat.data_ptr(), flat.numel(), out.data_ptr(),
                               int(dtype == torch.bfloat16))
        return out.view(*ids.shape, k)

    def quantize_activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (M, K) as the matmul quantizes it: codes (M, nb*32) int8, scales (M, nb) fp32 and
        code sums (M, nb) int32, per block of 32."""
        x = x.contiguous()
        m, k = x.shape
        nb = -(-k // 32)
        xq = torch.empty(m, nb * 32, dtype=torch.int8)
        xd = torch.empty(m, nb, dtype=torch.float32)
        xs = torch.empty(m, nb, dtype=torch.int32)
        self.lib.ql_quantize_activations(x.data_ptr(), int(x.dtype == torch.bfloat16), m, k, xq.data_ptr(),
                                         xd.data_ptr(), xs.data_ptr())
        return xq, xd, xs


def kernels() -> QLinearKernels | None:
    """The binding of this machine's native library, or None where it is not built."""
    global _bound
    if _bound is False:
        lib = load()
        _bound = QLinearKernels(lib) if lib is not None and hasattr(lib, "ql_matmul") else None
    return _bound
