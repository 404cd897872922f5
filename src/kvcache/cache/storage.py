"""Paged KV storage: the tensors behind the block pool.

Per layer, K and V live in flat slot arrays of shape (Hkv, (num_blocks + 1) * block_size, D);
token t of a sequence sits at slot block_table[t // block_size] * block_size + t % block_size.
New tokens are scattered to their slots; attention gathers whole blocks (block_size x D runs,
far cheaper to copy than single slots). The extra last block is a zeroed "null" block that
padding entries of a gather point to (masked out, but finite, so no NaN leaks through
attention). Storage knows bytes, not requests.
"""

from __future__ import annotations

import torch

from kvcache.cache.attention import AttentionBackend, DecodeSinks, attention_backend
from kvcache.cache.base import StepKVDefaults
from kvcache.models.step import DecodeBlocks


class PagedKVStorage:
    """K and V slot arrays for all layers, allocated once from a block count."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", attention: AttentionBackend | None = None):
        """`attention`: how a forward pass attends over these slots (the engine passes its model's
        backend); by default the native kernels where they run."""
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.device = torch.device(device)
        self.attention = attention or attention_backend(dtype, self.device)
        slots = (num_blocks + 1) * block_size
        # torch.empty: pages are committed as blocks are first written; only written slots are ever read
        # head-major, so a gather yields (S, D) runs per head: what attention kernels stream best
        self.k = torch.empty((num_layers, num_kv_heads, slots, head_dim), dtype=dtype, device=self.device)
        self.v = torch.empty((num_layers, num_kv_heads, slots, head_dim), dtype=dtype, device=self.device)
        self.null_block = num_blocks
        self._zeroed: set[int] = set()
        self.zero_blocks([num_blocks])

    def zero_blocks(self, block_ids) -> None:
        """Zero blocks the first time they are used. A gather reads whole blocks, slots past a
        sequence's end included; those are masked, but must be finite (0 x NaN is NaN), and
        torch.empty memory may hold anything. Zeroing on first use keeps pages uncommitted
        until the pool actually grows into them."""
        for b in block_ids:
            if b not in self._zeroed:
                self._zeroed.add(b)
                lo, hi = b * self.block_size, (b + 1) * self.block_size
                self.k[:, :, lo:hi] = 0
                self.v[:, :, lo:hi] = 0

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy each (source, copy) block pair's slots, every layer's K and V (copy-on-write of
        a block forked sequences share). The copies count as zeroed: they hold the source's values."""
        bs = self.block_size
        for src, dst in pairs:
            self.k[:, :, dst * bs : (dst + 1) * bs] = self.k[:, :, src * bs : (src + 1) * bs]
            self.v[:, :, dst * bs : (dst + 1) * bs] = self.v[:, :, src * bs : (src + 1) * bs]
            self._zeroed.add(dst)

    def read_blocks(self, block_ids: list[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the K and V of the first `num_tokens` slots of `block_ids` (in order):
        (num_layers, Hkv, num_tokens, D) each. For saving a sequence's cache."""
        bs = self.block_size
        slots = torch.tensor([b * bs + i for b in block_ids for i in range(bs)][:num_tokens], device=self.device)
        return self.k.index_select(2, slots).cpu(), self.v.index_select(2, slots).cpu()

    def write_blocks(self, block_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Fill whole blocks from k, v (num_layers, Hkv, len(block_ids) * block_size, D), e.g. a
        restored snapshot. The blocks count as zeroed: every slot of them now holds a value."""
        bs = self.block_size
        if k.shape[2] != len(block_ids) * bs or k.shape != v.shape:
            raise ValueError(f"K/V of shape {tuple(k.shape)} do not fill {len(block_ids)} blocks of {bs} tokens.")
        slots = torch.tensor([b * bs + i for b in block_ids for i in range(bs)], device=self.device)
        self.k.index_copy_(2, slots, k.to(self.device, self.dtype))
        self.v.index_copy_(2, slots, v.to(self.device, self.dtype))
        self._zeroed.update(block_ids)

    def gather_tokens(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of K and V at per-layer, per-head slots (L, Hkv, K): (L, Hkv, K, D) each
        (what an eviction policy keeps, head by head)."""
        idx = slots[..., None].expand(*slots.shape, self.head_dim)  # (L, Hkv, K, D)
        return torch.gather(self.k, 2, idx), torch.gather(self.v, 2, idx)

    def write_tokens(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v (L, Hkv, K, D) to the K slots `slots` (K,) of every layer and head."""
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)

    def keys_at(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """Keys of `layer` at `slots` (N,): (Hkv, N, D) (knorm scores them)."""
        return self.k[layer][:, slots]

    # -- what a forward pass does with a layer --------------------------------------------
    saves_sessions = True  # read_blocks / write_blocks move float K/V (session snapshots)
    decode_sinks = True  # decode_attention meets attention sinks with their own query (paged sinks)

    def scatter(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Scatter k, v (B, Hkv, T, D) to `slots` (B*T,), row-major over (B, T)."""
        b, h, t, d = k.shape
        self.k[layer].index_copy_(1, slots, k.transpose(0, 1).reshape(h, b * t, d))
        self.v[layer].index_copy_(1, slots, v.transpose(0, 1).reshape(h, b * t, d))

    def read_range(self, layer: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of slots [lo, hi) as (1, Hkv, hi - lo, D) views (no copy)."""
        return self.k[layer][None, :, lo:hi], self.v[layer][None, :, lo:hi]

    def read_rows(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of each row's blocks, blocks (B, NB): (B, Hkv, NB * block_size, D), gathered."""
        b, nb = blocks.shape
        h, d, s = self.num_kv_heads, self.head_dim, nb * self.block_size
        idx = blocks.reshape(-1)
        kb = self.k[layer].view(h, -1, self.block_size * d)  # (Hkv, blocks, bs*D)
        vb = self.v[layer].view(h, -1, self.block_size * d)
        k_all = kb.index_select(1, idx).view(h, b, s, d).transpose(0, 1)  # (B, Hkv, S, D)
        v_all = vb.index_select(1, idx).view(h, b, s, d).transpose(0, 1)  # (B, Hkv, S, D)
        return k_all, v_all

    def decode_attention(self, layer: int, q: torch.Tensor, table: torch.Tensor, lo: torch.Tensor,
                         hi: torch.Tensor, sinks: DecodeSinks | None = None) -> torch.Tensor:
        """Attention of one query per row q (B, Hq, D) over its blocks (table (B, NB) int32,
        tokens lo <= t < hi) by the storage's backend (read in place by the native one).
        Returns (B, Hq, D). `sinks`: attention sinks met with their own query."""
        return self.attention.paged_decode(q, self.k[layer], self.v[layer], table, lo, hi, self.block_size, sinks)

    def chunk_attention(self, layer: int, q: torch.Tensor, table: torch.Tensor, kv_len: int,
                        min_slot: torch.Tensor | None) -> torch.Tensor:
        """A prompt chunk q (1, Hq, T, D), the last T of the kv_len tokens of its blocks (table
        (1, NB)), causal (from min_slot (T,) on under a window), read through the table by the
        storage's backend (`AttentionBackend.paged_chunk`). Returns (1, T, Hq*D)."""
        return self.attention.paged_chunk(q, self.k[layer], self.v[layer], table, kv_len, self.block_size, min_slot)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.k.element_size()

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes (block_size slots, all layers, K and V)."""
        return self.block_size * self.bytes_per_token

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks (the null block excluded): num_blocks x bytes per block."""
        return self.num_blocks * self.bytes_per_block


def decode_rows(read_blocks: torch.Tensor, kv_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`decode_attention`'s per-row inputs: block table (B, NB) int32 and token range
    lo, hi (B,) int64 (each row attends to its first kv_lens[b] slots), on the table's device."""
    dev = read_blocks.device
    return (read_blocks.to(torch.int32), torch.zeros(len(kv_lens), dtype=torch.int64, device=dev),
            torch.tensor(kv_lens, dtype=torch.int64, device=dev))


def slot_mask(read_blocks: torch.Tensor, kv_lens: list[int], block_size: int) -> torch.Tensor:
    """Bool (B, 1, 1, S) over the S = NB * block_size gathered slots: True for each row's
    first kv_lens[b] (one decode query per row; the rest is padding)."""
    s_all = read_blocks.shape[1] * block_size
    lens = torch.tensor(kv_lens, device=read_blocks.device)[:, None]  # (B, 1)
    return (torch.arange(s_all, device=read_blocks.device)[None] < lens)[:, None, None, :]  # (B, 1, 1, S)


class SlotStepView(StepKVDefaults):
    """A forward pass's view of paged storage whose blocks the scheduler already allocated:
    nothing to reserve or advance; `write` scatters the step's K/V (B, Hkv, T, D) to
    `self.write_slots` (row-major over (B, T)) and returns None, so the model calls `attend`."""

    storage: "PagedKVStorage"
    write_slots: torch.Tensor

    def reserve(self, n_slots: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[None, None]:
        self.storage.scatter(layer, self.write_slots, k, v)
        return None, None


class PagedStepView(SlotStepView):
    """One forward pass's view of paged storage, with the interface `LlamaModel.forward` uses.

    write_slots (N,): where the step's new tokens go, row-major over (B, T).
    read_blocks (B, NB): each row's block table, padded with the null block; attention sees
    the S = NB * block_size slots they span (the step's own tokens included: they are
    written before they are read) and the runner's mask hides slots past each row's length.
    """

    def __init__(self, storage: PagedKVStorage, write_slots: torch.Tensor, read_blocks: torch.Tensor,
                 kv_len: int | None = None, first_block: int | None = None, kv_lens: list[int] | None = None,
                 observer=None):
        """`kv_len`: when every row attends to exactly that many slots, the gathered K/V are cut
        to it, so attention needs no padding mask (single sequences, equal-length batches).
        `first_block`: a single row whose blocks are consecutive from this id is read as a
        view of the storage, with no gather copy (common: the pool hands out blocks in order).
        `kv_lens`: each row's slot count; given for a decode step (one token per row), it lets
        a backend that reads in place attend straight from the blocks (no gather, no mask, no
        padding; `in_place`).
        `observer(layer, q, k)`: sees each layer's queries and keys (an eviction scorer)."""
        self.storage, self.write_slots, self.read_blocks = storage, write_slots, read_blocks
        self.attention = storage.attention
        self.observer = observer
        self.kv_len, self.first_block = kv_len, first_block
        self.in_place = kv_lens is not None and storage.attention.reads_in_place
        if self.in_place:
            self.table, self.lo, self.hi = decode_rows(read_blocks, kv_lens)  # (B, NB), (B,), (B,)
        self.length = read_blocks.shape[1] * storage.block_size  # only for a default mask; runners pass one

    def observes(self, t: int) -> bool:
        return self.observer is not None

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        self.observer(layer, q, k)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Scatter k, v (B, Hkv, T, D) into their slots; gather (B, Hkv, S, D) for attention."""
        st = self.storage
        st.scatter(layer, self.write_slots, k, v)
        if self.in_place and k.shape[2] == 1:
            self._written = None
            return None, None  # attend() reads the blocks in place
        s = self.read_blocks.shape[1] * st.block_size
        if self.first_block is not None:  # one row, consecutive blocks: a view, no copy
            lo = self.first_block * st.block_size
            return self.kept_for_attention(*st.read_range(layer, lo, lo + (self.kv_len if self.kv_len is not None
                                                                            else s)))  # (1, Hkv, S, D)
        k_all, v_all = st.read_rows(layer, self.read_blocks)  # (B, Hkv, S, D)
        if self.kv_len is not None:
            k_all, v_all = k_all[:, :, : self.kv_len], v_all[:, :, : self.kv_len]  # (B, Hkv, kv_len, D)
        return self.kept_for_attention(k_all, v_all)

    def decode_blocks(self, t: int) -> DecodeBlocks | None:
        """The storage for a fused decode step: one token per row read in place from plain float
        blocks, with no observer (the native backend; a paged quantized storage attends itself)."""
        st = self.storage
        if t != 1 or not self.in_place or self.observer is not None or not isinstance(st, PagedKVStorage):
            return None
        return DecodeBlocks(st.k, st.v, self.write_slots, self.table, self.lo, self.hi, st.block_size)

    def attend(self, layer: int, q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of q (B, Hq, T, D): a decode step with each row over its own blocks, read in
        place by the backend, else over the K/V `write` gathered, with `mask`. Returns (B, T, Hq*D)."""
        if self._written is not None:
            return self.attend_written(q, mask)
        b, hq, _, d = q.shape
        o = self.storage.decode_attention(layer, q.reshape(b, hq, d), self.table, self.lo, self.hi)  # (B, Hq, D)
        return o.view(b, 1, hq * d)
