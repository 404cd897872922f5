"""Fused CPU kernels for the decode path (RMSNorm, RoPE, SwiGLU, attention over the cache).

A decode step on a small model is mostly per-op overhead: each of these replaces several
torch ops with one ctypes call. The C source is compiled on first use (`build.py`); where
that is impossible (no compiler, CUDA tensors, other dtypes) `supports` says no and the
model keeps its torch ops. Results agree with the torch ops to float rounding (fp32
math throughout; bf16 is rounded once on store), which `tests/unit/test_native.py` checks.
"""

from __future__ import annotations

import ctypes

import torch

from kvcache.native.build import load
from kvcache.native.signatures import F32_KERNELS, KERNELS, MAX_GROUP, MAX_HEAD_DIM, attention_fits, declare

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_fns: dict[tuple[str, torch.dtype], ctypes._CFuncPtr] | None = None


def symbols(lib: ctypes.CDLL) -> list[tuple[str, torch.dtype, list]]:
    """(name, dtype, argtypes) of every kernel to bind from this build of the library: the
    prefill kernel only where it was compiled (AVX-512); the symbol is `name_suffix`."""
    wanted = [(name, dtype, args) for name, args in KERNELS.items() for dtype in _SUFFIX]
    wanted += [(name, torch.float32, args) for name, args in F32_KERNELS.items()]
    has_prefill = bool(lib.prefill_attn_available())
    return [w for w in wanted if w[0] != "prefill_attn" or has_prefill]


def _functions() -> dict:
    global _fns
    if _fns is None:
        lib = load()
        _fns = {}
        if lib is not None:
            for name, dtype, argtypes in symbols(lib):
                _fns[(name, dtype)] = declare(getattr(lib, f"{name}_{_SUFFIX[dtype]}"), argtypes)
    return _fns


def supports(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether the native kernels run for tensors of this dtype on this device."""
    return torch.device(device).type == "cpu" and dtype in _SUFFIX and bool(_functions())


#: Whether a model's attention shape is within the kernels' limits.
fits = attention_fits


def _check_shape(head_dim: int, num_heads: int, num_kv_heads: int) -> None:
    if not fits(head_dim, num_heads, num_kv_heads):
        raise ValueError(f"native attention supports head_dim <= {MAX_HEAD_DIM} and <= {MAX_GROUP} query heads "
                         f"per KV head, got {head_dim} and {num_heads // num_kv_heads}.")


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _check_contiguous(*tensors: torch.Tensor) -> None:
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("paged quantized storage must be contiguous per layer.")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of a contiguous x (..., H) with weight (H,)."""
    x = x.contiguous()
    n = x.shape[-1]
    out = torch.empty_like(x)
    _functions()[("rms_norm", x.dtype)](_ptr(x), _ptr(weight), _ptr(out), x.numel() // n, n, eps)
    return out


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, n_rot: int) -> None:
    """Rotate, in place, the first `n_rot` heads of x (B, T, heads, D) by the angles of
    `positions` (B*T int64, row-major) read from tables cos, sin (L, D) (sin signed)."""
    if not x.is_contiguous():
        raise ValueError("rotary_ needs a contiguous tensor (it rotates in place).")
    b, t, heads, d = x.shape
    _functions()[("rotary", x.dtype)](_ptr(x), _ptr(cos), _ptr(sin), _ptr(positions), b * t, heads, n_rot, d)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for a contiguous (..., 2I) tensor holding [gate | up]."""
    gate_up = gate_up.contiguous()
    inter = gate_up.shape[-1] // 2
    out = gate_up.new_empty(gate_up.shape[:-1] + (inter,))
    _functions()[("silu_mul", gate_up.dtype)](_ptr(gate_up), _ptr(out), gate_up.numel() // (2 * inter), inter)
    return out


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, -1) for x (B, V): the first index of each row's largest value (NaN
    counts as largest). Returns (B,) int64."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _functions()[("argmax_rows", x.dtype)](_ptr(x), _ptr(out), x.shape[0], x.shape[-1])
    return out


def prefill_attention_built() -> bool:
    """Whether the library has the prefill kernel (an AVX-512 build): `symbols` bound it."""
    return ("prefill_attn", torch.float32) in _functions()


def prefill_attention_fits(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `prefill_attention` takes these operands: head_dim 64 on an AVX-512 build,
    each query token's heads side by side, each KV head's keys one contiguous run."""
    return (prefill_attention_built() and q.shape[-1] == 64 and q.shape[0] == 1
            and q.stride(3) == 1 and q.stride(1) == 64 and k.stride(3) == 1 and k.stride(2) == 64
            and q.shape[1] // k.shape[1] <= MAX_GROUP)  # v: checked by prefill_attention


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of a prompt chunk: q (1, Hq, T, D) at the last T of the S positions
    of k, v (1, Hkv, S, D); query t sees keys 0 .. S - T + t. Returns (1, T, Hq*D), as
    `models.sdpa.grouped_sdpa` with a causal mask does (fp32 math; GQA heads share K/V reads)."""
    _, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if v.stride() != k.stride():
        raise ValueError("prefill_attention needs k and v laid out alike.")
    out = q.new_empty(1, t, hq * d)
    _functions()[("prefill_attn", q.dtype)](_ptr(q), _ptr(k), _ptr(v), _ptr(out), t, s - t, hq, hkv, q.stride(2),
                                            k.stride(1), d ** -0.5)
    return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, lo: torch.Tensor,
                     hi: torch.Tensor, num_kv_heads: int, block_size: int, row_stride: int,
                     head_stride: int, sinks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                     ) -> torch.Tensor:
    """Attention of one query per row, read in place from cache storage (no gather, no mask).

    q (B, Hq, D) contiguous. k, v: storage tensors (any shape) whose element for row b, KV
    head h and token t sits at b*row_stride + h*head_stride + slot*D, where
    slot = table[b, t // block_size] * block_size + t % block_size. table (B, NB) int32;
    row b attends to tokens lo[b] <= t < hi[b] (int64). Returns (B, Hq, D).
    `sinks` = (qs, sink_end, gap_end): attention sinks; row b's tokens t < sink_end[b] score
    against the query qs[b] (B, Hq, D) instead, and tokens sink_end[b] <= t < gap_end[b] are
    skipped (the dropped part of the sinks' blocks; int64 (B,) both).
    """
    q = q.contiguous()
    b, hq, d = q.shape
    _check_shape(d, hq, num_kv_heads)
    out = torch.empty_like(q)
    qs = sink_end = gap_end = None
    if sinks is not None:
        qs, sink_end, gap_end = sinks
        qs = qs.contiguous()
        if qs.shape != q.shape or qs.dtype != q.dtype or sink_end.shape != (b,) or gap_end.shape != (b,):
            raise ValueError("sinks needs qs shaped and typed like q and (B,) int64 sink_end and gap_end.")
    _functions()[("decode_attn", q.dtype)](_ptr(q), _ptr(out), _ptr(k), _ptr(v), _ptr(table), _ptr(lo), _ptr(hi),
                                   b, hq, num_kv_heads, d, table.shape[1], block_size, row_stride, head_stride,
                                   d ** -0.5, *(None if t is None else _ptr(t) for t in (qs, sink_end, gap_end)))
    return out


def _heads_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x (H, n, D) with each head's (n, D) rows contiguous (heads may sit apart: a view of a
    longer store is read in place); copied only when they are not."""
    return x if x.stride(2) == 1 and (x.shape[1] <= 1 or x.stride(1) == x.shape[2]) else x.contiguous()


def quantized_decode_attention(q: torch.Tensor, exact_k: torch.Tensor, exact_v: torch.Tensor, qk, qv) -> torch.Tensor:
    """Attention of one query (Hq, D) over a KIVI-quantized layer of batch 1, from the codes.

    exact_k, exact_v (Hkv, ne, D): the exact tokens (sinks and tail, any order; each head's
    rows contiguous, heads at any stride, or they are copied). qk, qv:
    `cache.quant.QTensor` views of the quantized keys (per channel) and values (per token),
    batch 1 (keys and values may differ in bits). Values stored rotated (qv.rotation R) are attended in the rotated
    space, the exact ones rotated to join them, and the output rotated back.
    Computes in fp32; returns (Hq, D) fp32.
    """
    return quantized_decode_attention_rows(q[None], [(exact_k, exact_v, qk, qv)])[0]


def quantized_decode_attention_rows(q: torch.Tensor, rows: list[tuple]) -> torch.Tensor:
    """`quantized_decode_attention` for B sequences in one native call: q (B, Hq, D), rows[b] =
    (exact_k, exact_v, qk, qv) of sequence b's layer, all of one format (the same groups,
    widths and value rotation). Returns (B, Hq, D) fp32."""
    b, hq, d = q.shape
    qk0, qv0 = rows[0][2], rows[0][3]
    hkv = qk0.shape[1]
    _check_shape(d, hq, hkv)
    rot = qv0.rotation
    q = q.float().contiguous()
    out = torch.empty((b, hq, d), dtype=torch.float32)
    keep, meta = [], []  # keep: tensors made here must live until the call returns
    for i, (exact_k, exact_v, qk, qv) in enumerate(rows):
        nq = qk.shape[2]
        if qv.shape[2] != nq or qk.axis != "channel" or qv.axis != "token":
            raise ValueError("quantized keys must be per channel and values per token, equally long.")
        if (qk.bits, qk.group_size, qv.bits, qv.group_size) != (qk0.bits, qk0.group_size, qv0.bits, qv0.group_size):
            raise ValueError("every row must hold the same quantized format.")
        for t in (qk.data, qk.scale, qk.zero, qv.data, qv.scale, qv.zero):
            if t.stride(-1) != 1 or t.stride(-2) != t.shape[-1]:
                raise ValueError("quantized tensors must be contiguous within each head.")
        ek = _heads_contiguous(exact_k.float())
        ev = _heads_contiguous(exact_v.float() if rot is None else exact_v.float() @ rot)  # (Hkv, ne, D)
        keep += [ek, ev]
        meta += [_ptr(q[i]), _ptr(out[i]), _ptr(ek), _ptr(ev), ek.shape[1], ek.stride(0), ev.stride(0),
                 _ptr(qk.data), _ptr(qk.scale), _ptr(qk.zero), qk.data.stride(1), qk.scale.stride(1),
                 _ptr(qv.data), _ptr(qv.scale), _ptr(qv.zero), qv.data.stride(1), qv.scale.stride(1), nq]
    m = torch.tensor(meta, dtype=torch.int64)  # (B * 18,)
    _functions()[("quant_decode_attn_rows", torch.float32)](
        _ptr(m), b, qk0.group_size, qv0.group_size, qk0.bits, qv0.bits, hq, hkv, d, d ** -0.5)
    return out if rot is None else out @ rot.T


def paged_quantized_decode_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor,
                                     k_zero: torch.Tensor, v_codes: torch.Tensor, v_scale: torch.Tensor,
                                     v_zero: torch.Tensor, table: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                                     block_size: int, key_bits: int, value_bits: int,
                                     key_rotation: torch.Tensor | None = None,
                                     value_rotation: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per row over paged blocks held per-token quantized, from the codes.

    q (B, Hq, D). One layer of `cache.paged_quant.PagedQuantizedStorage`: codes (Hkv, slots, D*bits/8)
    uint8, scale and zero (Hkv, slots, D/g) fp16 for K and for V (each its own bits and group g). table
    (B, NB) int32 and lo, hi (B,) int64 as in `decode_attention` (blocks of `block_size` slots). Keys
    stored rotated (`key_rotation` R) are scored against q @ R; values stored rotated
    (`value_rotation`) are attended in that space and the output rotated back. Returns (B, Hq, D)
    in q's dtype (fp32 math).
    """
    b, hq, d = q.shape
    hkv = k_codes.shape[0]
    _check_shape(d, hq, hkv)
    _check_contiguous(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)
    qf = q.float() if key_rotation is None else q.float() @ key_rotation  # keys hold K @ R: q.k = (q @ R).(k @ R)
    qf = qf.contiguous()
    out = torch.empty_like(qf)
    _functions()[("paged_quant_decode_attn", torch.float32)](
        _ptr(qf), _ptr(out), _ptr(k_codes), _ptr(k_scale), _ptr(k_zero), _ptr(v_codes), _ptr(v_scale),
        _ptr(v_zero), _ptr(table), _ptr(lo), _ptr(hi), b, hq, hkv, d, table.shape[1], block_size,
        k_codes.stride(0), k_scale.stride(0), v_codes.stride(0), v_scale.stride(0), d // k_scale.shape[-1],
        d // v_scale.shape[-1], key_bits, value_bits, d ** -0.5)
    if value_rotation is not None:
        out = out @ value_rotation.T
    return out.to(q.dtype)


def quantize_to_slots(x: torch.Tensor, slots: torch.Tensor, bits: int, group: int, codes: torch.Tensor,
                      scale: torch.Tensor, zero: torch.Tensor) -> None:
    """Quantize x (Hkv, N, D) per token (groups of `group` channels, min-max, no clipping) and
    write token i to slot slots[i] of codes (Hkv, S, D*bits/8) uint8 and scale, zero (Hkv, S,
    D/group) fp16, contiguous. Same bytes as `cache.quant.quantize(x, bits, group, "token")`."""
    h, n, d = x.shape
    if d > MAX_HEAD_DIM or d % group or 8 % bits:
        raise ValueError(f"cannot quantize head_dim {d} in groups of {group} at {bits} bits natively.")
    _check_contiguous(codes, scale, zero)
    xf = x.float().contiguous()
    sl = slots.to(torch.int64).contiguous()
    _functions()[("quantize_to_slots", torch.float32)](_ptr(xf), _ptr(sl), h, n, d, group, bits, _ptr(codes),
                                                       _ptr(scale), _ptr(zero), codes.stride(0), scale.stride(0))


#: Most rows `skinny_matmul` is used for: it streams the weight once per four rows, so past
#: this a blocked GEMM (torch's) that reuses each weight row across many rows is faster.
SKINNY_ROWS = 16


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) fp32 (a few rows) times a weight stored (N, K) (F.linear's layout): (..., N).
    The threads split the weight's rows and stream them once per four rows of x; each row's
    result is the same whatever the other rows."""
    x = x.contiguous()
    k = x.shape[-1]
    n = weight.shape[0]
    y = x.new_empty(x.shape[:-1] + (n,))
    _functions()[("matmul_nk", torch.float32)](_ptr(x), _ptr(weight), _ptr(y), x.numel() // k, k, n)
    return y
