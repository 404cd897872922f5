"""Attention, every way a KV store does it, behind one interface: `AttentionBackend`.

The methods are the shapes of attention the KV layer needs:

- `grouped`: GQA over K/V in hand, with a mask (the dense cache, gathered blocks);
- `causal_chunk`: a prompt chunk over contiguous K/V whose last T slots are its own;
- `sinks_chunk`: queries over sink tokens (met by the query rotated back) and a window;
- `paged_decode`: one query per row over its own blocks (a block table; the dense cache is
  one block per row), optionally with attention sinks;
- `paged_quantized_decode`: the same over blocks holding per-token quantized codes;
- `paged_chunk`, `paged_quantized_chunk`: a prompt chunk, causal over its blocks (its own
  tokens last), read through its block table;
- `quantized_decode_rows`: one query per sequence over a KIVI-quantized layer (per-channel
  key codes, per-token value codes, exact sinks and tail).

`AttentionBackend` itself is the torch reference (gathers, masks, SDPA). `NativeCPUAttention`
runs the `kvcache.native` kernels where they apply: decode reads the blocks or codes in place
(`reads_in_place`: a store then attends itself instead of handing the model K/V), bf16
prompt chunks use the causal prefill kernel. `TritonAttention` (`cache/triton_attention.py`,
CUDA) reads the blocks in place for decode rows and prompt chunks alike (`chunks_in_place`).
The backend is picked once, when a model's cache, storage or engine is built
(`attention_backend`, `model_attention`); a KV object asks its backend, never the native
module, and Triton is imported only when its backend is picked.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvcache.native import ops as native
from kvcache.cache.quant import QTensor, dequantize, quantized_scores, unpack_codes
from kvcache.models.rope import apply_rotary
from kvcache.models.sdpa import grouped_sdpa
from kvcache.models.step import causal_mask


@dataclass(frozen=True)
class DecodeSinks:
    """Attention sinks in `paged_decode`: row b's tokens t < sink_end[b] score against its query
    rotated by (cos[b], sin[b]) (back to its position inside the cache); tokens
    sink_end[b] <= t < gap_end[b] (the dropped rest of the sinks' blocks) are skipped."""

    cos: torch.Tensor  # (B, D)
    sin: torch.Tensor  # (B, D) signed, as `apply_rotary` takes it
    sink_end: torch.Tensor  # (B,) int64
    gap_end: torch.Tensor  # (B,) int64
    rows: torch.Tensor  # (B,) int64 arange: row b's rotation is row b of cos, sin


@dataclass(frozen=True)
class QuantizedSlots:
    """One layer of K or V held per-token quantized in paged slots."""

    codes: torch.Tensor  # (Hkv, slots, D * bits / 8) uint8
    scale: torch.Tensor  # (Hkv, slots, D / g) fp16
    zero: torch.Tensor  # (Hkv, slots, D / g) fp16
    bits: int
    rotation: torch.Tensor | None  # (D, D): the codes hold x @ R


class AttentionBackend:
    """The interface, implemented with torch ops (any device, any float dtype)."""

    name = "torch"
    reads_in_place = False  # decode reads a store where it lies; False: the store hands over K/V
    chunks_in_place = False  # prompt chunks read their blocks through the table (`paged_chunk`); False: gathered

    def grouped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q (B, Hq, T, D) over k, v (B, Hkv, S, D), mask bool (B, 1, T, S) or None. Returns (B, T, Hq*D)."""
        return grouped_sdpa(q, k, v, mask)

    def causal_chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: Callable[[], torch.Tensor], plain: bool) -> torch.Tensor:
        """A prompt chunk q (1, Hq, T, D) at the last T of the S slots of k, v (1, Hkv, S, D).
        `mask()` builds its bool mask (1, 1, T, S), called only when needed; `plain`: that mask
        is plain causal (query t sees slots 0 .. S - T + t), so a causal kernel may stand in.
        Returns (1, T, Hq*D)."""
        return self.grouped(q, k, v, mask())

    def sinks_chunk(self, q: torch.Tensor, qs: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor,
                    window_mask: torch.Tensor, sink_mask: torch.Tensor) -> torch.Tensor:
        """Queries q (B, Hq, T, D) over the sinks, the first n_sink slots of k, v (B, Hkv, S, D),
        scored with qs (the queries rotated to their cache positions; None when n_sink is 0)
        and sink_mask (B, T, n_sink), and over all S slots with q and window_mask (B, T, S):
        two score blocks, one softmax. Returns (B, T, Hq*D)."""
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        scale = d ** -0.5
        kf = k.float()
        qw = q.float().reshape(b, hkv, g * t, d)  # (B, Hkv, G*T, D): row g*T + t is query t of head g
        logits = qw @ kf.transpose(-1, -2) * scale  # (B, Hkv, G*T, S)
        mask, values = window_mask, v
        n_sink = sink_mask.shape[-1]
        if n_sink:
            ks = kf[:, :, :n_sink]  # (B, Hkv, n_sink, D): the head slots are positions 0..
            sink_logits = qs.float().reshape(b, hkv, g * t, d) @ ks.transpose(-1, -2) * scale  # (B, Hkv, G*T, n_sink)
            logits = torch.cat([sink_logits, logits], -1)  # (B, Hkv, G*T, n_sink + S)
            mask = torch.cat([sink_mask, mask], -1)  # (B, T, n_sink + S)
            values = torch.cat([v[:, :, :n_sink], v], 2)  # (B, Hkv, n_sink + S, D)
        mask = mask[:, None].repeat(1, 1, g, 1)  # (B, 1, G*T, n_sink + S)
        probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)  # (B, Hkv, G*T, n_sink + S)
        o = probs.to(values.dtype) @ values  # (B, Hkv, G*T, D)
        return o.view(b, hq, t, d).transpose(1, 2).reshape(b, t, hq * d)  # (B, T, Hq*D)

    def paged_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, lo: torch.Tensor,
                     hi: torch.Tensor, block_size: int, sinks: DecodeSinks | None = None) -> torch.Tensor:
        """One query per row q (B, Hq, D) over its tokens lo[b] <= t < hi[b] (int64 (B,)), token t
        at slot table[b, t // block_size] * block_size + t % block_size (table (B, NB) int32).
        k, v: one layer's storage, (Hkv, slots, D) shared by the rows (paged blocks) or
        (B, Hkv, cap, D) one per row (the dense cache: a table of zeros, block_size = cap).
        Returns (B, Hq, D). Here: gather the blocks, mask, attend."""
        b, hq, d = q.shape
        kk, vv = _gather(k, table, block_size), _gather(v, table, block_size)  # (B, Hkv, S, D)
        valid = _token_range(kk.shape[2], lo, hi, q.device)  # (B, S)
        if sinks is None:
            return self.grouped(q[:, :, None], kk, vv, valid[:, None, None]).view(b, hq, d)
        t = torch.arange(kk.shape[2], device=q.device)[None]  # (1, S)
        sink_end, gap_end = sinks.sink_end.to(q.device)[:, None], sinks.gap_end.to(q.device)[:, None]  # (B, 1)
        keep = valid & ~((t >= sink_end) & (t < gap_end))  # (B, S)
        qs = apply_rotary(q, sinks.cos[:, None], sinks.sin[:, None])  # (B, Hq, D) at cache positions
        hkv = kk.shape[1]
        kf = kk.float().transpose(-1, -2)  # (B, Hkv, D, S)
        logits = q.float().reshape(b, hkv, hq // hkv, d) @ kf  # (B, Hkv, G, S)
        sink_logits = qs.float().reshape(b, hkv, hq // hkv, d) @ kf
        logits = torch.where((t < sink_end)[:, None, None], sink_logits, logits) * d ** -0.5
        probs = logits.masked_fill(~keep[:, None, None], float("-inf")).softmax(-1)  # (B, Hkv, G, S)
        return (probs @ vv.float()).to(q.dtype).reshape(b, hq, d)

    def paged_quantized_decode(self, q: torch.Tensor, k: QuantizedSlots, v: QuantizedSlots, table: torch.Tensor,
                               lo: torch.Tensor, hi: torch.Tensor, block_size: int) -> torch.Tensor:
        """`paged_decode` over blocks of per-token quantized codes. Returns (B, Hq, D) in q's
        dtype. Here: gather and dequantize the blocks, mask, attend."""
        b, hq, d = q.shape
        kk = _dequantized(k, table, block_size, d, q.dtype)  # (B, Hkv, S, D)
        vv = _dequantized(v, table, block_size, d, q.dtype)
        valid = _token_range(kk.shape[2], lo, hi, q.device)  # (B, S)
        return self.grouped(q[:, :, None], kk, vv, valid[:, None, None]).view(b, hq, d)

    def paged_chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, kv_len: int,
                    block_size: int, min_slot: torch.Tensor | None = None) -> torch.Tensor:
        """A prompt chunk q (1, Hq, T, D): the last T of the kv_len tokens of its blocks (table
        (1, NB); token t at slot table[0, t // block_size] * block_size + t % block_size of
        k, v (Hkv, slots, D)). Query i sees tokens up to its own, from min_slot[i] on when
        given ((T,), a window). Returns (1, T, Hq*D). Here: gather, mask, attend."""
        kk = _gather(k, table, block_size)[:, :, :kv_len]  # (1, Hkv, kv_len, D)
        vv = _gather(v, table, block_size)[:, :, :kv_len]
        return self.grouped(q, kk, vv, windowed_causal_mask(kv_len, q.shape[2], min_slot, q.device))

    def paged_quantized_chunk(self, q: torch.Tensor, k: QuantizedSlots, v: QuantizedSlots, table: torch.Tensor,
                              kv_len: int, block_size: int, min_slot: torch.Tensor | None = None) -> torch.Tensor:
        """`paged_chunk` over blocks of per-token quantized codes. Returns (1, T, Hq*D) in q's dtype."""
        d = q.shape[3]
        kk = _dequantized(k, table, block_size, d, q.dtype)[:, :, :kv_len]  # (1, Hkv, kv_len, D)
        vv = _dequantized(v, table, block_size, d, q.dtype)[:, :, :kv_len]
        return self.grouped(q, kk, vv, windowed_causal_mask(kv_len, q.shape[2], min_slot, q.device))

    def quantized_decode_rows(self, q: torch.Tensor, rows: list[tuple]) -> torch.Tensor:
        """One query per sequence q (B, Hq, D) over its KIVI-quantized layer, rows[b] = (exact_k,
        exact_v (Hkv, ne, D), key QTensor per channel, value QTensor per token, batch 1), all of
        one format. Returns (B, Hq, D) in q's dtype. Here: scores from the key codes with the
        scales folded into the query, value scales folded into the probabilities."""
        return torch.stack([_quantized_row(q[i], *row) for i, row in enumerate(rows)])


class NativeCPUAttention(AttentionBackend):
    """The `kvcache.native` kernels (CPU, fp32 / bf16); torch where a shape is beyond them."""

    name = "native-cpu"
    reads_in_place = True

    def causal_chunk(self, q, k, v, mask, plain):
        # bf16 only: fp32 keeps SDPA, whose rounding transformers shares
        if plain and q.dtype == torch.bfloat16 and native.prefill_attention_fits(q, k):
            return native.prefill_attention(q, k, v)  # (1, T, Hq*D)
        return super().causal_chunk(q, k, v, mask, plain)

    def paged_decode(self, q, k, v, table, lo, hi, block_size, sinks=None):
        b, hq, d = q.shape
        hkv = k.shape[-3]
        if not native.fits(d, hq, hkv):
            return super().paged_decode(q, k, v, table, lo, hi, block_size, sinks)
        with_sinks = None
        if sinks is not None:
            qs = q.clone(memory_format=torch.contiguous_format)  # (B, Hq, D), never a view of q
            native.rotary_(qs.view(b, 1, hq, d), sinks.cos, sinks.sin, sinks.rows, hq)  # in place, row b by its own
            with_sinks = (qs, sinks.sink_end, sinks.gap_end)
        row_stride = k.stride(0) if k.dim() == 4 else 0
        return native.decode_attention(q, k, v, table, lo, hi, hkv, block_size, row_stride, k.stride(-3),
                                       with_sinks)  # (B, Hq, D)

    def paged_quantized_decode(self, q, k, v, table, lo, hi, block_size):
        if not native.fits(q.shape[2], q.shape[1], k.codes.shape[0]):
            return super().paged_quantized_decode(q, k, v, table, lo, hi, block_size)
        return native.paged_quantized_decode_attention(
            q, k.codes, k.scale, k.zero, v.codes, v.scale, v.zero, table, lo, hi, block_size, k.bits, v.bits,
            k.rotation, v.rotation)  # (B, Hq, D)

    def quantized_decode_rows(self, q, rows):
        if not native.fits(q.shape[2], q.shape[1], rows[0][2].shape[1]):
            return super().quantized_decode_rows(q, rows)
        return native.quantized_decode_attention_rows(q, rows).to(q.dtype)  # (B, Hq, D)


TORCH = AttentionBackend()
NATIVE_CPU = NativeCPUAttention()


def triton_available() -> bool:
    """Whether Triton is installed and not turned off (`KVCACHE_TRITON=0`); nothing is imported."""
    return os.environ.get("KVCACHE_TRITON", "1") != "0" and importlib.util.find_spec("triton") is not None


def triton_backend() -> AttentionBackend:
    """The Triton backend (imports Triton on first call)."""
    global _TRITON
    if _TRITON is None:
        from kvcache.cache.triton_attention import TritonAttention

        _TRITON = TritonAttention()
    return _TRITON


_TRITON: AttentionBackend | None = None


def attention_backend(dtype: torch.dtype, device: torch.device | str, use_native: bool = True) -> AttentionBackend:
    """The backend for tensors of `dtype` on `device`: the native kernels where they run and
    `use_native` allows them, Triton on CUDA where it is installed, else torch."""
    if use_native and native.supports(dtype, device):
        return NATIVE_CPU
    if torch.device(device).type == "cuda" and triton_available():
        return triton_backend()
    return TORCH


def model_attention(model) -> AttentionBackend:
    """The backend for a model's KV stores: native exactly when the model runs the native kernels."""
    return attention_backend(model.dtype, model.device, model.native)


def windowed_causal_mask(kv_len: int, t: int, min_slot: torch.Tensor | None, device) -> torch.Tensor:
    """Bool (1, 1, T, kv_len) for T queries at the last T of kv_len slots: causal, and query i
    sees no slot before min_slot[i] (a window that moved during the chunk) when given."""
    mask = causal_mask(None, 1, kv_len - t, t, device)  # (1, 1, T, kv_len)
    if min_slot is not None:
        mask = mask & (torch.arange(kv_len, device=device)[None, :] >= min_slot.to(device)[:, None])  # (1, 1, T, S)
    return mask


def _gather(x: torch.Tensor, table: torch.Tensor, block_size: int) -> torch.Tensor:
    """Each row's slots in table order: x (Hkv, slots, w) shared or (B, Hkv, cap, w) per row ->
    (B, Hkv, NB * block_size, w)."""
    table = table.to(device=x.device, dtype=torch.int64)
    b, nb = table.shape
    t = torch.arange(nb * block_size, device=x.device)  # (S,)
    slots = table[:, t // block_size] * block_size + t % block_size  # (B, S)
    if x.dim() == 3:
        return x[:, slots].transpose(0, 1)  # (Hkv, B, S, w) -> (B, Hkv, S, w)
    return x[torch.arange(b, device=x.device)[:, None], :, slots].transpose(1, 2)  # (B, S, Hkv, w) -> (B, Hkv, S, w)


def _token_range(s: int, lo: torch.Tensor, hi: torch.Tensor, device) -> torch.Tensor:
    """Bool (B, S): lo[b] <= t < hi[b]."""
    t = torch.arange(s, device=device)[None]  # (1, S)
    return (t >= lo.to(device)[:, None]) & (t < hi.to(device)[:, None])


def _dequantized(x: QuantizedSlots, table: torch.Tensor, block_size: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """Each row's slots of a quantized layer, dequantized: (B, Hkv, NB * block_size, D) of `dtype`."""
    codes, scale, zero = (_gather(t, table, block_size).contiguous() for t in (x.codes, x.scale, x.zero))
    q = QTensor(codes, scale, zero, (*codes.shape[:3], d), x.bits, d // scale.shape[-1], "token", x.rotation)
    return dequantize(q, dtype=dtype)


def _quantized_row(q: torch.Tensor, exact_k: torch.Tensor, exact_v: torch.Tensor, qk: QTensor,
                   qv: QTensor) -> torch.Tensor:
    """`quantized_decode_rows` for one sequence: q (Hq, D) -> (Hq, D). The codes become floats
    once each; p @ (s*C + z) = (p*s) @ C + p @ z per value group."""
    hq, d = q.shape
    h = qk.shape[1]
    nq = qk.shape[2]
    qf = q.reshape(1, h, hq // h, d)  # (1, Hkv, G, D): a KV group's query heads side by side
    ek, ev = exact_k[None].to(q.dtype), exact_v[None].to(q.dtype)  # (1, Hkv, ne, D)
    codes = torch.empty((1, h, nq, d), dtype=q.dtype, device=q.device)  # float codes, keys then values
    scores = torch.cat([qf @ ek.transpose(-1, -2),  # (1, Hkv, G, ne)
                        quantized_scores(qf, qk, codes_out=codes)], -1)  # (1, Hkv, G, nq)
    p = (scores * (1.0 / math.sqrt(d))).softmax(-1)  # (1, Hkv, G, ne + nq)
    ne = ek.shape[2]
    if qv.rotation is not None:  # quantized values hold V @ R: attend in that space, rotate back at the end
        ev = ev @ qv.rotation.to(ev)
    o = p[..., :ne] @ ev  # (1, Hkv, G, D)
    codes.copy_(unpack_codes(qv.data, qv.bits))  # value codes as floats
    pq = p[..., ne:]  # (1, Hkv, G, nq)
    sv, zv = qv.scale.to(q.dtype), qv.zero.to(q.dtype)  # (1, Hkv, nq, D/gv)
    gv = qv.group_size
    for i in range(d // gv):  # value groups along head_dim (1 or a few)
        cols = slice(i * gv, (i + 1) * gv)
        o[..., cols] += (pq * sv[..., i].unsqueeze(2)) @ codes[..., cols] + pq @ zv[..., i : i + 1]
    if qv.rotation is not None:
        o = o @ qv.rotation.T.to(o)
    return o.reshape(hq, d)
