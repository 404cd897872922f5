"""Attention sinks (StreamingLLM) over paged blocks: one forward pass's view for the engine.

The engine keeps a sinks sequence's first blocks (they hold the sink tokens) and frees window
blocks as the window moves on, as it does for `window`. Keys stay rotated at their absolute
positions, as in every paged block, so a block means the same to every sequence that shares
it through the prefix cache and nothing is ever rewritten. The query at absolute position P
attends to:

- the sinks, tokens 0 .. n_sink-1, at the distance they have inside the cache: the query
  meets them rotated back to its cache position P - shift(P), where shift(P) counts the
  tokens dropped between the sinks and the window, so query-sink distances stay below
  n_sink + window + block however long the stream (StreamingLLM);
- the window, tokens window_start(P) .. P (`Sinks.window_start`), at their true distances.

What a query sees depends only on its own position, never on how the prompt was chunked, so
batched, chunked, preempted and prefix-hit runs compute the same attention as a
token-by-token run (the per-sequence `SequenceCache` in decode). Prompt chunks attend with
torch ops over the gathered live blocks: two score blocks (sinks with the shifted query,
window with the query as it is) share one softmax. Decode rows over float blocks use the
native kernel, read in place: one run of the row's table in which the sink tokens score
against the shifted query and the dropped rest of the sinks' blocks is skipped.
"""

from __future__ import annotations

import torch

from kvcache import native
from kvcache.cache.storage import SlotStepView
from kvcache.cache.policies.sinks import Sinks
from kvcache.models.rope import RotaryTable, apply_rotary

FAR = 1 << 62  # the position of a padding slot: after every query, so always masked


class PagedSinksStepView(SlotStepView):
    """A step's K/V writes and sinks + window attention over each row's live blocks.

    read_blocks (B, NB): per row, its sink blocks (padded with the null block to
    `Sinks.sink_blocks`) followed by its live window blocks, padded with the null block.
    slot_positions (B, NB * block_size): the absolute position of every gathered slot (FAR
    for padding). query_positions (B, T): the absolute positions of the step's tokens.
    """

    def __init__(self, storage, write_slots: torch.Tensor, read_blocks: torch.Tensor, slot_positions: torch.Tensor,
                 query_positions: torch.Tensor, sinks: Sinks, rope: RotaryTable, native_decode: bool = False):
        """`native_decode`: a decode step (T == 1) over storage whose native kernel takes the
        sinks' own query (`decode_sinks`): blocks are read in place, no gather."""
        self.storage, self.write_slots, self.read_blocks = storage, write_slots, read_blocks
        self.n_sink = sinks.n_sink
        self.length = read_blocks.shape[1] * storage.block_size  # the model's default mask only; unused here
        unit = storage.block_size
        p = query_positions  # (B, T)
        # Window.first_kept / Sinks.window_start for every query at once
        first_kept = torch.clamp(torch.div(p - sinks.size, unit, rounding_mode="floor") * unit, min=0)  # (B, T)
        start = torch.clamp(first_kept, min=sinks.n_sink)  # (B, T) oldest window token each query sees
        cos, sin = rope.lookup(start - sinks.n_sink)  # (B, T, 1, D): rotation by the shift (grows the table)
        self.native_decode = native_decode and p.shape[1] == 1
        if self.native_decode:  # one run of each row's table; the kernel meets the sinks with their own query
            self.table = read_blocks.to(torch.int32).cpu()  # (B, NB)
            start_slot = torch.searchsorted(slot_positions, start).reshape(-1).cpu()  # (B,) the window's first slot
            self.hi = torch.searchsorted(slot_positions, p, right=True).reshape(-1).cpu()  # (B,)
            if self.n_sink:
                self.lo = torch.zeros_like(self.hi)
                self.sink_end = torch.full_like(self.hi, self.n_sink)  # (B,) then skip to the window's start
                self.gap_end = start_slot
                self.shift_cos, self.shift_sin = cos[:, 0, 0], -sin[:, 0, 0]  # (B, D) rotations back
                self.rows = torch.arange(p.shape[0])  # (B,) row b rotates by table row b
            else:
                self.lo = start_slot
            return
        pos = slot_positions[:, None, :]  # (B, 1, S)
        self.window_mask = (pos >= start[..., None]) & (pos <= p[..., None])  # (B, T, S)
        sink_ids = torch.arange(self.n_sink, device=p.device)
        self.sink_mask = sink_ids[None, None, :] <= p[..., None]  # (B, T, n_sink)
        self.sink_cos, self.sink_sin = cos.transpose(1, 2), -sin.transpose(1, 2)  # (B, 1, T, D) ...taken back

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Attention of q (B, Hq, T, D), rotated at absolute positions, over the row's sinks and
        window. Returns (B, T, Hq*D)."""
        if self.native_decode:
            return self._attend_native(layer, q)
        k, v = self.storage.read_rows(layer, self.read_blocks)  # (B, Hkv, S, D)
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        scale = d ** -0.5
        kf = k.float()
        qw = q.float().reshape(b, hkv, g * t, d)  # (B, Hkv, G*T, D): row g*T + t is query t of head g
        logits = qw @ kf.transpose(-1, -2) * scale  # (B, Hkv, G*T, S)
        mask = self.window_mask
        values = v
        if self.n_sink:
            qs = apply_rotary(q, self.sink_cos, self.sink_sin)  # (B, Hq, T, D) at the queries' cache positions
            ks = kf[:, :, : self.n_sink]  # (B, Hkv, n_sink, D): the head slots are positions 0..
            sink_logits = qs.float().reshape(b, hkv, g * t, d) @ ks.transpose(-1, -2) * scale  # (B, Hkv, G*T, n_sink)
            logits = torch.cat([sink_logits, logits], -1)  # (B, Hkv, G*T, n_sink + S)
            mask = torch.cat([self.sink_mask, mask], -1)  # (B, T, n_sink + S)
            values = torch.cat([v[:, :, : self.n_sink], v], 2)  # (B, Hkv, n_sink + S, D)
        mask = mask[:, None].repeat(1, 1, g, 1)  # (B, 1, G*T, n_sink + S)
        probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)  # (B, Hkv, G*T, n_sink + S)
        o = probs.to(values.dtype) @ values  # (B, Hkv, G*T, D)
        return o.view(b, hq, t, d).transpose(1, 2).reshape(b, t, hq * d)  # (B, T, Hq*D)

    def _attend_native(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Decode: one native call per layer, reading the blocks in place; sink tokens score
        against the query rotated back to its cache position."""
        b, hq, _, d = q.shape
        sinks = None
        if self.n_sink:
            qs = q.transpose(1, 2).clone(memory_format=torch.contiguous_format)  # (B, 1, Hq, D), never a view of q
            native.rotary_(qs, self.shift_cos, self.shift_sin, self.rows, hq)  # in place, row b by -shift_b
            sinks = (qs.view(b, hq, d), self.sink_end, self.gap_end)
        o = self.storage.decode_attention(layer, q.reshape(b, hq, d), self.table, self.lo, self.hi, sinks)  # (B, Hq, D)
        return o.view(b, 1, hq * d)
