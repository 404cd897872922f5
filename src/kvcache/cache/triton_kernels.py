"""Triton kernels of paged attention: query rows attend to K/V read in place from the blocks.

One kernel serves decode rows and prompt chunks. Its work is a list of sequences; sequence s
has `q_len[s]` query rows starting at row `q_start[s]` of Q, and its tokens t < hi[s] sit at
slot table[s, t // block_size] * block_size + t % block_size. Query i of sequence s is the
token at position hi[s] - q_len[s] + i and sees the tokens lo[s] <= t <= its position
(causal; a decode row is q_len = 1), optionally also t >= floor[q_start[s] + i] (a window
that moved during a chunk) and, with attention sinks, the tokens t < sink_end[s] scored
against a second query (rotated back to its position inside the cache) while
sink_end[s] <= t < gap_end[s] are skipped.

The G query heads of a KV head are folded into the rows of one program (GQA without
repeating K/V): a program takes BLOCK_M (query, head) rows of one sequence and one KV head
and walks that sequence's tokens BLOCK_N at a time with an online softmax in fp32. Blocks
hold floats (read as stored) or per-token quantized codes (QUANT: channel c of a slot in
byte c % PACKED at bit (c // PACKED) * BITS, value = code * scale + zero per GROUP channels,
dequantized in registers; no float copy of the history is made).

Products run in the storage dtype with fp32 accumulation (bf16 tensor cores on a GPU), or in
fp32 where F32_DOT is set: off CUDA, i.e. under the interpreter, whose `tl.dot` misreads bf16.

Importing this module imports Triton; `kvcache.cache.triton_attention` is its only user.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 32  # tokens per inner step


@triton.jit
def _kv_tile(base, scale_base, zero_base, slots, d, ok, s_slot, s_meta,
             QUANT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, PACKED: tl.constexpr):
    """K or V at `slots` (BLOCK_N,), channels `d` (BLOCK_D,): (BLOCK_N, BLOCK_D) as stored, or
    fp32 dequantized from codes. `ok` masks what may be read."""
    if QUANT:
        byte = tl.load(base + slots[:, None] * s_slot + (d % PACKED)[None, :], mask=ok, other=0).to(tl.int32)
        code = (byte >> ((d // PACKED) * BITS)[None, :]) & ((1 << BITS) - 1)
        meta = slots[:, None] * s_meta + (d // GROUP)[None, :]
        scale = tl.load(scale_base + meta, mask=ok, other=0.0).to(tl.float32)
        zero = tl.load(zero_base + meta, mask=ok, other=0.0).to(tl.float32)
        x = code.to(tl.float32) * scale + zero
    else:
        x = tl.load(base + slots[:, None] * s_slot + d[None, :], mask=ok, other=0.0)
    return x


@triton.jit
def paged_attention_kernel(
        Q, QS, Out, K, KScale, KZero, V, VScale, VZero, Table, Lo, Hi, QStart, QLen, Floor, SinkEnd, GapEnd,
        s_qr, s_qh, s_or, s_oh,
        s_kb, s_kh, s_ks, s_kmh, s_kms, s_vb, s_vh, s_vs, s_vmh, s_vms, s_tb,
        block_size, sm_scale,
        G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        QUANT: tl.constexpr, K_BITS: tl.constexpr, K_GROUP: tl.constexpr, K_PACKED: tl.constexpr,
        V_BITS: tl.constexpr, V_GROUP: tl.constexpr, V_PACKED: tl.constexpr,
        HAS_SINKS: tl.constexpr, HAS_FLOOR: tl.constexpr, F32_DOT: tl.constexpr):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    tile = tl.program_id(2)
    n_q = tl.load(QLen + seq)
    if tile * BLOCK_M >= n_q * G:
        return
    q0 = tl.load(QStart + seq)
    lo = tl.load(Lo + seq)
    hi = tl.load(Hi + seq)

    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) folded rows: query r // G, head r % G
    i = r // G
    row_ok = r < n_q * G
    pos = hi - n_q + i  # each row's own position: the last token it sees
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    qh = kvh * G + r % G
    q_off = (q0 + i).to(tl.int64)[:, None] * s_qr + qh[:, None] * s_qh + d[None, :]
    q_ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_off, mask=q_ok, other=0.0)  # (BLOCK_M, BLOCK_D)
    if F32_DOT:
        q = q.to(tl.float32)
    if HAS_SINKS:
        qs = tl.load(QS + q_off, mask=q_ok, other=0.0).to(q.dtype)  # the same rows rotated back for the sinks
        sink_end = tl.load(SinkEnd + seq)
        gap_end = tl.load(GapEnd + seq)
    if HAS_FLOOR:
        floor = tl.load(Floor + q0 + i, mask=row_ok, other=0)  # (BLOCK_M,)

    m = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    last_row = tl.minimum(tile * BLOCK_M + BLOCK_M, n_q * G) - 1
    end = tl.minimum(hi, hi - n_q + last_row // G + 1)  # one past the last token this tile's rows see
    k_base = K + seq.to(tl.int64) * s_kb + kvh * s_kh
    v_base = V + seq.to(tl.int64) * s_vb + kvh * s_vh
    n = tl.arange(0, BLOCK_N)
    for start in range(lo - lo % BLOCK_N, end, BLOCK_N):
        t = start + n  # (BLOCK_N,) token positions
        t_ok = (t >= lo) & (t < end)
        blk = tl.load(Table + seq * s_tb + t // block_size, mask=t_ok, other=0).to(tl.int64)
        slots = blk * block_size + t % block_size
        ok = t_ok[:, None] & d_ok[None, :]
        k = _kv_tile(k_base, KScale + kvh * s_kmh, KZero + kvh * s_kmh, slots, d, ok, s_ks, s_kms,
                     QUANT, K_BITS, K_GROUP, K_PACKED).to(q.dtype)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale  # (BLOCK_M, BLOCK_N)
        see = t_ok[None, :] & (t[None, :] <= pos[:, None])
        if HAS_SINKS:
            s_sink = tl.dot(qs, tl.trans(k), input_precision="ieee") * sm_scale
            s = tl.where((t < sink_end)[None, :], s_sink, s)
            see = see & ((t < sink_end) | (t >= gap_end))[None, :]
        if HAS_FLOOR:
            see = see & (t[None, :] >= floor[:, None])
        s = tl.where(see, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = _kv_tile(v_base, VScale + kvh * s_vmh, VZero + kvh * s_vmh, slots, d, ok, s_vs, s_vms,
                     QUANT, V_BITS, V_GROUP, V_PACKED).to(q.dtype)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision="ieee")
        m = m_new
    l = tl.where(l == 0.0, 1.0, l)
    o = acc / l[:, None]
    o_off = (q0 + i).to(tl.int64)[:, None] * s_or + qh[:, None] * s_oh + d[None, :]
    tl.store(Out + o_off, o.to(Out.dtype.element_ty), mask=q_ok)


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(row, head, slot) strides of a K/V slot array: (Hkv, slots, w) shared by every row
    (row stride 0) or (B, Hkv, cap, w) one per row."""
    assert x.stride(-1) == 1, "the last axis must be contiguous"
    return (x.stride(0) if x.dim() == 4 else 0), x.stride(-3), x.stride(-2)


def paged_attention(q: torch.Tensor, out: torch.Tensor, k, v, table: torch.Tensor, lo: torch.Tensor,
                    hi: torch.Tensor, q_start: torch.Tensor, q_len: torch.Tensor, max_q_len: int, block_size: int,
                    floor: torch.Tensor | None = None, sinks: tuple | None = None) -> torch.Tensor:
    """Launch the kernel. q, out (Nq, Hq, D) (last axis contiguous); k, v float slot arrays
    (Hkv, slots, D) / (B, Hkv, cap, D), or `QuantizedSlots` (codes + fp16 scale, zero);
    table (S, NB); lo, hi, q_start, q_len (S,) on q's device; floor (Nq,) or None;
    sinks (qs like q, sink_end (S,), gap_end (S,)) or None. Writes and returns `out`."""
    nq, hq, d = q.shape
    quant = not isinstance(k, torch.Tensor)
    if quant:
        kd, ks, kz, vd, vs, vz = k.codes, k.scale, k.zero, v.codes, v.scale, v.zero
        k_meta, v_meta = (ks.stride(0), ks.stride(1)), (vs.stride(0), vs.stride(1))
        k_fmt = (k.bits, d // ks.shape[-1], kd.shape[-1])
        v_fmt = (v.bits, d // vs.shape[-1], vd.shape[-1])
    else:
        kd, ks, kz, vd, vs, vz = k, k, k, v, v, v
        k_meta = v_meta = (0, 0)
        k_fmt = v_fmt = (8, 1, 1)
    hkv = kd.shape[-3]
    g = hq // hkv
    block_m = 16 if max_q_len * g <= 16 else 64
    qs, sink_end, gap_end = sinks if sinks is not None else (q, lo, lo)
    grid = (table.shape[0], hkv, triton.cdiv(max_q_len * g, block_m))
    paged_attention_kernel[grid](
        q, qs, out, kd, ks, kz, vd, vs, vz, table, lo, hi, q_start, q_len,
        floor if floor is not None else q_start, sink_end, gap_end,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *_strides(kd), *k_meta, *_strides(vd), *v_meta, table.stride(0),
        block_size, d ** -0.5,
        G=g, D=d, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(d)),
        QUANT=quant, K_BITS=k_fmt[0], K_GROUP=k_fmt[1], K_PACKED=k_fmt[2],
        V_BITS=v_fmt[0], V_GROUP=v_fmt[1], V_PACKED=v_fmt[2],
        HAS_SINKS=sinks is not None, HAS_FLOOR=floor is not None, F32_DOT=q.device.type != "cuda")
    return out
