"""`TritonAttention`: the attention backend for CUDA, Triton kernels over the paged blocks.

Decode rows (`paged_decode`, with or without attention sinks; `paged_quantized_decode` from
per-token codes) and prompt chunks (`paged_chunk`, `paged_quantized_chunk`: causal over the
chunk's cached blocks and its own tokens, optionally a moving window floor) read K/V in place
through the block table (`cache.triton_kernels`); a plain causal chunk over K/V in hand
(`causal_chunk`) is the same kernel over one "block". What the kernels do not cover (K/V in
hand with an arbitrary mask, sinks prompt chunks, KIVI rows) stays the torch reference.

The kernels run on CUDA; on CPU tensors they run under Triton's interpreter
(`TRITON_INTERPRET=1`, set before Triton is imported), which is how the tests check them
against the torch reference without a GPU. Importing this module imports Triton; the rest of
the package reaches it only through `attention.attention_backend`.
"""

from __future__ import annotations

import torch

from kvcache.cache import triton_kernels
from kvcache.cache.attention import AttentionBackend, DecodeSinks, QuantizedSlots
from kvcache.models.rope import apply_rotary


def _on(x: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """x as a contiguous `dtype` tensor on `device` (a no-op when it already is)."""
    return x.to(device=device, dtype=dtype).contiguous()


def _rows(q: torch.Tensor) -> torch.Tensor:
    """q with a contiguous last axis (what the kernel indexes with stride 1)."""
    return q if q.stride(-1) == 1 else q.contiguous()


class TritonAttention(AttentionBackend):
    """Paged decode and prompt chunks by Triton kernels; the torch reference for the rest."""

    name = "triton"
    reads_in_place = True
    chunks_in_place = True

    def paged_decode(self, q, k, v, table, lo, hi, block_size, sinks: DecodeSinks | None = None):
        b, hq, d = q.shape
        dev = q.device
        q = _rows(q)
        with_sinks = None
        if sinks is not None:  # the kernel reads qs with q's strides: both contiguous
            q = q.contiguous()
            qs = apply_rotary(q, sinks.cos[:, None].to(q), sinks.sin[:, None].to(q))  # (B, Hq, D) at cache positions
            with_sinks = (qs.contiguous(), _on(sinks.sink_end, dev), _on(sinks.gap_end, dev))
        ones = torch.ones(b, dtype=torch.int64, device=dev)
        return triton_kernels.paged_attention(
            q, torch.empty_like(q), k, v, _on(table, dev, torch.int32), _on(lo, dev), _on(hi, dev),
            torch.arange(b, device=dev), ones, 1, block_size, sinks=with_sinks)  # (B, Hq, D)

    def paged_quantized_decode(self, q, k: QuantizedSlots, v: QuantizedSlots, table, lo, hi, block_size):
        b, hq, d = q.shape
        dev = q.device
        qk = q if k.rotation is None else q @ k.rotation.to(q)  # the codes hold K @ R: score q @ R against them
        out = torch.empty_like(q)
        triton_kernels.paged_attention(
            _rows(qk), out, k, v, _on(table, dev, torch.int32), _on(lo, dev), _on(hi, dev),
            torch.arange(b, device=dev), torch.ones(b, dtype=torch.int64, device=dev), 1, block_size)
        return out if v.rotation is None else out @ v.rotation.T.to(out)  # (B, Hq, D) back from V @ R

    def paged_chunk(self, q, k, v, table, kv_len, block_size, min_slot=None):
        return self._chunk(q, k, v, table, kv_len, block_size, min_slot)

    def paged_quantized_chunk(self, q, k: QuantizedSlots, v: QuantizedSlots, table, kv_len, block_size,
                              min_slot=None):
        qk = q if k.rotation is None else q @ k.rotation.to(q)  # (1, Hq, T, D)
        o = self._chunk(qk, k, v, table, kv_len, block_size, min_slot)  # (1, T, Hq*D)
        if v.rotation is None:
            return o
        t, d = q.shape[2], q.shape[3]
        return (o.view(1, t, -1, d) @ v.rotation.T.to(o)).view(1, t, -1)  # back from V @ R

    def causal_chunk(self, q, k, v, mask, plain):
        if not plain:
            return super().causal_chunk(q, k, v, mask, plain)
        s = k.shape[2]
        table = torch.zeros(1, 1, dtype=torch.int32, device=q.device)  # K/V in hand: one block of S slots
        return self._chunk(q, _rows(k), _rows(v), table, s, s, None)

    def _chunk(self, q, k, v, table, kv_len, block_size, min_slot):
        """Prompt chunk q (1, Hq, T, D) at the last T of kv_len tokens. Returns (1, T, Hq*D)."""
        _, hq, t, d = q.shape
        dev = q.device
        rows = _rows(q[0].transpose(0, 1))  # (T, Hq, D)
        out = torch.empty(t, hq, d, dtype=q.dtype, device=dev)
        zero = torch.zeros(1, dtype=torch.int64, device=dev)
        triton_kernels.paged_attention(
            rows, out, k, v, _on(table, dev, torch.int32), zero, torch.full((1,), kv_len, device=dev), zero,
            torch.full((1,), t, device=dev), t, block_size,
            floor=None if min_slot is None else _on(min_slot, dev))
        return out.view(1, t, hq * d)
