"""One forward pass over a whole scheduler step: decode rows and prompt chunks together.

The step's tokens are laid out as one sequence (B = 1, T = all of them): first one token per
decode row, then each prompt chunk's tokens. Every matmul then runs once over all of them,
so the weights are streamed once per step instead of once for the decode batch and again
for each chunk, and the decode rows share the chunk's large, efficient matmuls. Attention
stays per sequence, through the storage's attention backend: the decode rows read their
blocks in place (`paged_decode`) or, where the backend does not, gathered and masked; each
chunk attends causally over its own blocks (`causal_chunk`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from kvcache.cache.attention import windowed_causal_mask
from kvcache.cache.storage import PagedKVStorage, SlotStepView, decode_rows, slot_mask


@dataclass
class ChunkSegment:
    """A prompt chunk's place in the step and what it attends to."""

    offset: int  # index of its first token in the step
    num_tokens: int
    read_blocks: torch.Tensor  # (1, NB) its block table
    kv_len: int  # slots it attends to (its own tokens included)
    first_block: int | None  # its blocks are consecutive from this id: read as a view
    min_slot: torch.Tensor | None = None  # (T,) the oldest slot each query sees (a window), or None: all

    def mask(self, device) -> torch.Tensor:
        """Bool (1, 1, T, kv_len): each of its queries sees the slots up to its own (from its
        `min_slot` on, under a window)."""
        return windowed_causal_mask(self.kv_len, self.num_tokens, self.min_slot, device)


@dataclass
class DecodeSegment:
    """The step's decode rows (its first `num_rows` tokens), each over its own blocks."""

    num_rows: int
    read_blocks: torch.Tensor  # (B, NB) padded with the null block
    kv_lens: list[int]  # slots each row attends to (its new token included)


class MixedStepView(SlotStepView):
    """The `LlamaModel.forward` cache interface for a step of decode rows and prompt chunks.

    write_slots (N,): where the step's N tokens go, in step order. `write` scatters them all
    and returns None, so the model calls `attend`, which returns (1, N, Hq*D).
    """


    def __init__(self, storage: PagedKVStorage, write_slots: torch.Tensor, decode: DecodeSegment | None,
                 chunks: list[ChunkSegment]):
        """Attention is the storage's backend's: with the native kernels the decode rows attend in
        place, and bf16 chunks through the causal prefill kernel (1.2-1.5x SDPA's speed on long
        chunks)."""
        self.storage, self.write_slots, self.decode, self.chunks = storage, write_slots, decode, chunks
        self.attention = storage.attention
        self.in_place = decode is not None and self.attention.reads_in_place
        self.masks: dict[int, torch.Tensor] = {}  # chunk index -> its causal mask, made once a step
        if self.in_place:
            self.table, self.lo, self.hi = decode_rows(decode.read_blocks, decode.kv_lens)  # (B, NB), (B,), (B,)
        elif decode is not None:
            self.valid = slot_mask(decode.read_blocks, decode.kv_lens, storage.block_size)  # (B, 1, 1, S)
        self.length = 0

    def attend(self, layer: int, q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q (1, Hq, N, D) -> (1, N, Hq*D): each segment over its own blocks, with its own mask
        (the step's `mask` is None)."""
        _, hq, n, d = q.shape
        st = self.storage
        out = q.new_empty(1, n, hq * d)  # (1, N, Hq*D)
        if self.decode is not None:
            b = self.decode.num_rows
            qd = q[0, :, :b].transpose(0, 1)  # (B, Hq, D)
            if self.in_place:
                o = st.decode_attention(layer, qd, self.table, self.lo, self.hi)  # (B, Hq, D)
                out[0, :b] = o.reshape(b, hq * d)
            else:
                k_all, v_all = st.read_rows(layer, self.decode.read_blocks)  # (B, Hkv, S, D)
                out[0, :b] = self.attention.grouped(qd[:, :, None], k_all, v_all, self.valid)[:, 0]  # (B, Hq*D)
        for i, c in enumerate(self.chunks):
            qc = q[:, :, c.offset : c.offset + c.num_tokens]  # (1, Hq, T, D)
            if self.attention.chunks_in_place:  # the backend reads the chunk's blocks through its table
                out[:, c.offset : c.offset + c.num_tokens] = st.chunk_attention(layer, qc, c.read_blocks, c.kv_len,
                                                                                c.min_slot)  # (1, T, Hq*D)
                continue
            if c.first_block is not None:  # consecutive blocks: a view, no copy
                lo = c.first_block * st.block_size
                k_all, v_all = st.read_range(layer, lo, lo + c.kv_len)  # (1, Hkv, S, D)
            else:
                k_all, v_all = st.read_rows(layer, c.read_blocks)  # (1, Hkv, S', D)
                k_all, v_all = k_all[:, :, : c.kv_len], v_all[:, :, : c.kv_len]  # (1, Hkv, S, D)
            o = self.attention.causal_chunk(qc, k_all, v_all, partial(self._mask, i, q.device),
                                            c.min_slot is None)
            out[:, c.offset : c.offset + c.num_tokens] = o  # (1, T, Hq*D)
        return out

    def _mask(self, i: int, device) -> torch.Tensor:
        """Chunk i's mask (1, 1, T, kv_len), made once a step."""
        if i not in self.masks:
            self.masks[i] = self.chunks[i].mask(device)
        return self.masks[i]
