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
token-by-token run (the per-sequence `SequenceCache` in decode). Prompt chunks attend over
the gathered live blocks (`AttentionBackend.sinks_chunk`): two score blocks (sinks with the
shifted query, window with the query as it is) share one softmax. Decode rows over float
blocks, where the storage's backend reads in place, are one `paged_decode` run of the row's
table in which the sink tokens score against the shifted query and the dropped rest of the
sinks' blocks is skipped (`DecodeSinks`).
"""

from __future__ import annotations

import torch

from kvcache.cache.attention import DecodeSinks
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
                 query_positions: torch.Tensor, sinks: Sinks, rope: RotaryTable):
        """A decode step (T == 1) over storage whose backend reads in place and takes the sinks'
        own query (`decode_sinks`) reads the blocks in place, no gather (`in_place`)."""
        self.storage, self.write_slots, self.read_blocks = storage, write_slots, read_blocks
        self.n_sink = sinks.n_sink
        self.length = read_blocks.shape[1] * storage.block_size  # the model's default mask only; unused here
        unit = storage.block_size
        p = query_positions  # (B, T)
        # Window.first_kept / Sinks.window_start for every query at once
        first_kept = torch.clamp(torch.div(p - sinks.size, unit, rounding_mode="floor") * unit, min=0)  # (B, T)
        start = torch.clamp(first_kept, min=sinks.n_sink)  # (B, T) oldest window token each query sees
        cos, sin = rope.lookup(start - sinks.n_sink)  # (B, T, 1, D): rotation by the shift (grows the table)
        self.attention = storage.attention
        self.in_place = p.shape[1] == 1 and storage.decode_sinks and self.attention.reads_in_place
        if self.in_place:  # one run of each row's table; the backend meets the sinks with their own query
            self.table = read_blocks.to(torch.int32)  # (B, NB)
            start_slot = torch.searchsorted(slot_positions, start).reshape(-1)  # (B,) the window's first slot
            self.hi = torch.searchsorted(slot_positions, p, right=True).reshape(-1)  # (B,)
            self.sinks = None
            if self.n_sink:
                self.lo = torch.zeros_like(self.hi)
                # sinks until n_sink, then skip to the window's start; (B, D) rotations back
                self.sinks = DecodeSinks(cos[:, 0, 0], -sin[:, 0, 0], torch.full_like(self.hi, self.n_sink), start_slot,
                                         torch.arange(p.shape[0], device=p.device))
            else:
                self.lo = start_slot
            return
        pos = slot_positions[:, None, :]  # (B, 1, S)
        self.window_mask = (pos >= start[..., None]) & (pos <= p[..., None])  # (B, T, S)
        sink_ids = torch.arange(self.n_sink, device=p.device)
        self.sink_mask = sink_ids[None, None, :] <= p[..., None]  # (B, T, n_sink)
        self.sink_cos, self.sink_sin = cos.transpose(1, 2), -sin.transpose(1, 2)  # (B, 1, T, D) ...taken back

    def attend(self, layer: int, q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of q (B, Hq, T, D), rotated at absolute positions, over the row's sinks and
        window, with the masks of its own (`mask` is None). Returns (B, T, Hq*D)."""
        b, hq, t, d = q.shape
        if self.in_place:  # one call per layer, reading the blocks in place
            o = self.storage.decode_attention(layer, q.reshape(b, hq, d), self.table, self.lo, self.hi,
                                              self.sinks)  # (B, Hq, D)
            return o.view(b, 1, hq * d)
        k, v = self.storage.read_rows(layer, self.read_blocks)  # (B, Hkv, S, D)
        qs = apply_rotary(q, self.sink_cos, self.sink_sin) if self.n_sink else None  # (B, Hq, T, D) at cache positions
        return self.attention.sinks_chunk(q, qs, k, v, self.window_mask, self.sink_mask)  # (B, T, Hq*D)
