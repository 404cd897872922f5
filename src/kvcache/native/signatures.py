"""The argument types of the native library's C functions, declared in one place for every binding
(`ops` and `qlinear` on torch tensors, `kvcache.solo` on numpy arrays). No torch here."""

from __future__ import annotations

import ctypes

_P, _I, _C, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float

#: Limits of the attention kernels' per-thread arrays (MAX_D, MAX_G in kernels.c).
MAX_HEAD_DIM, MAX_GROUP = 256, 16

#: kernels.c, built for fp32 and bf16: the symbol is `name_f32` / `name_bf16`.
KERNELS = {
    "rms_norm": [_P, _P, _P, _I, _I, _F],
    "rotary": [_P, _P, _P, _P, _I, _I, _I, _I],
    "silu_mul": [_P, _P, _I, _I],
    "argmax_rows": [_P, _P, _I, _I],
    "prefill_attn": [_P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _F],
    "decode_attn": [_P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _I, _F, _P, _P, _P],
}
#: kernels.c, built for fp32 only (`name_f32`).
F32_KERNELS = {
    "matmul_nk": [_P, _P, _P, _I, _I, _I],
    "quant_decode_attn_rows": [_P, _I, _I, _I, _I, _I, _I, _I, _I, _F],
    "quantize_to_slots": [_P, _P, _I, _I, _I, _I, _I, _P, _P, _P, _I, _I],
    "paged_quant_decode_attn": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _I, _I, _I,
                                _I, _I, _I, _I, _F],
}
#: qlinear.c, decode_layers.c, round_compensated.c: (argtypes, restype).
QLINEAR = {
    "ql_matmul": ([_P, _P, _P, _I, _I, _I, _I, _C, _C, _C], None),
    "ql_dequantize": ([_P, _C, _I, _I, _P, _I, _P, _C], None),
    "ql_quantize_activations": ([_P, _C, _I, _I, _C, _P, _P, _P], None),
    "ql_tile_bytes": ([_C, _I], _I),
    "ql_isa": ([], _C),
    "dl_decode_layers": ([_P, _P, _I, _I, _I, _I, _I, _I, _I, _F, _F, _P, _P, _P, _P, _P, _I, _I, _P, _P, _P, _P,
                          _I, _I, _C], None),
    "dl_fields": ([], _I),
    "rc_round_block": ([_P, _P, _I, _I, _I, _P, _P, _P, _P], None),
}


def declare(fn, argtypes: list, restype=None):
    """`fn` with its argument and return types set (ctypes checks every call against them)."""
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def declare_qlinear(lib: ctypes.CDLL) -> None:
    """Declare every `QLINEAR` function of a loaded library."""
    for name, (argtypes, restype) in QLINEAR.items():
        declare(getattr(lib, name), argtypes, restype)


def attention_fits(head_dim: int, num_heads: int, num_kv_heads: int) -> bool:
    """Whether a model's attention shape is within the kernels' limits (`MAX_HEAD_DIM`, `MAX_GROUP`)."""
    return head_dim <= MAX_HEAD_DIM and num_heads // num_kv_heads <= MAX_GROUP


def layer_row(attn_norm: int, qkv: tuple[int, int], o: tuple[int, int], mlp_norm: int, gate_up: tuple[int, int],
              down: tuple[int, int], digits: int) -> list[int]:
    """One row of `dl_decode_layers`' layer table, in decode_layers.c's DL_* order: the norms'
    addresses, each packed matrix as (address, format code), the activation digit count."""
    return [attn_norm, *qkv, *o, mlp_norm, *gate_up, *down, digits]
