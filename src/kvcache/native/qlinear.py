"""ctypes binding of the quantized-weight linear kernels (`qlinear.c`, built into the native library)
and of the decode step that runs every layer over them (`decode_layers.c`).

`kernels()` gives the binding of the library `build.load()` returns (None without one); tests
bind a library built for another vector target with `QLinearKernels(ctypes.CDLL(path))`.
"""

from __future__ import annotations

import ctypes

import torch

from kvcache.native.build import load
from kvcache.native.signatures import declare_qlinear

IO_DTYPES = (torch.float32, torch.bfloat16)
_bound: "QLinearKernels | None | bool" = False


class QLinearKernels:
    """The kernels of one loaded library."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        declare_qlinear(lib)
        self.layer_fields = lib.dl_fields()  # columns of `decode_layers`' layer table

    @property
    def isa(self) -> str:
        """The vector path this library runs: "avx512-vnni", "avx2" or "c"."""
        return {2: "avx512-vnni", 1: "avx2", 0: "c"}[self.lib.ql_isa()]

    def tile_bytes(self, fmt_code: int, blocks: int) -> int:
        return self.lib.ql_tile_bytes(fmt_code, blocks)

    def matmul(self, x: torch.Tensor, data: torch.Tensor, fmt_code: int, n: int, y: torch.Tensor, col: int = 0,
               digits: int = 1) -> None:
        """y[:, col:col+n] = x (M, K) @ W^T for W packed in `data`; x contiguous, y (M, ldy) with
        unit column stride, both of one dtype (fp32 or bf16); x's activations quantized to `digits`
        int8 digits per row (1, or 2: twice the integer work, almost no activation rounding)."""
        m, k = x.shape
        ptr = y.data_ptr() + col * y.element_size()
        self.lib.ql_matmul(x.data_ptr(), data.data_ptr(), ptr, m, k, n, y.stride(0), fmt_code, digits,
                           int(x.dtype == torch.bfloat16))

    def decode_layers(self, x: torch.Tensor, layers: torch.Tensor, heads: tuple[int, int, int], inter: int,
                      eps: float, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, slots: torch.Tensor, table: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                      block_size: int) -> None:
        """Every decoder layer of a decode step on x (B, H), in place (`decode_layers.c`). layers
        (L, layer_fields) int64; heads (Hq, Hkv, D); cos, sin (positions, D) RoPE tables; pos, slots,
        lo, hi (B,) int64; k, v (L, Hkv, slots, D) contiguous storage in x's dtype; table (B, NB) int32."""
        b, h = x.shape
        hq, hkv, d = heads
        self.lib.dl_decode_layers(x.data_ptr(), layers.data_ptr(), layers.shape[0], b, h, hq, hkv, d, inter, eps,
                                  d ** -0.5, cos.data_ptr(), sin.data_ptr(), pos.data_ptr(), k.data_ptr(),
                                  v.data_ptr(), k.stride(0), k.stride(1), slots.data_ptr(), table.data_ptr(),
                                  lo.data_ptr(), hi.data_ptr(), table.shape[1], block_size,
                                  int(x.dtype == torch.bfloat16))

    def round_block(self, block: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, inv: torch.Tensor,
                    codes: torch.Tensor, errors: torch.Tensor) -> None:
        """Error-compensated rounding of block (C, N) float32 rows in place (`round_compensated.c`):
        u (C, >=C) a view of H^-1's upper Cholesky factor with unit column stride; scale, inv (N,);
        codes (C, N) int8 and errors (C, N) float32 written; all contiguous along N."""
        c, n = block.shape
        if u.stride(1) != 1 or not (block.is_contiguous() and codes.is_contiguous() and errors.is_contiguous()):
            raise ValueError("round_block reads row-major tensors (unit column stride).")
        self.lib.rc_round_block(block.data_ptr(), u.data_ptr(), u.stride(0), c, n, scale.data_ptr(), inv.data_ptr(),
                                codes.data_ptr(), errors.data_ptr())

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

    def quantize_activations(self, x: torch.Tensor, digits: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (M, K) as the matmul quantizes it: codes (M * digits, nb*32) int8, scales (M * digits, nb)
        fp32 and code sums (M * digits, nb) int32, per block of 32; with `digits=2` (what int8 weights
        get) row 2r + 1 is the second digit of row r, its rounding residual quantized alike."""
        x = x.contiguous()
        m, k = x.shape
        nb = -(-k // 32)
        xq = torch.empty(m * digits, nb * 32, dtype=torch.int8)
        xd = torch.empty(m * digits, nb, dtype=torch.float32)
        xs = torch.empty(m * digits, nb, dtype=torch.int32)
        self.lib.ql_quantize_activations(x.data_ptr(), int(x.dtype == torch.bfloat16), m, k, digits, xq.data_ptr(),
                                         xd.data_ptr(), xs.data_ptr())
        return xq, xd, xs


def kernels() -> QLinearKernels | None:
    """The binding of this machine's native library, or None where it is not built."""
    global _bound
    if _bound is False:
        lib = load()
        _bound = QLinearKernels(lib) if lib is not None and hasattr(lib, "ql_matmul") else None
    return _bound
