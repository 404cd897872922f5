"""Paged KV storage: the tensors behind the block pool.

Per layer, K and V live in flat slot arrays of shape (num_blocks * block_size + 1, Hkv, D);
token t of a sequence sits at slot block_table[t // block_size] * block_size + t % block_size.
The extra last slot is a zeroed "null" slot that padding entries of a gather point to (masked
out, but finite, so no NaN leaks through attention). Storage knows bytes, not requests.
"""

from __future__ import annotations

import torch


class PagedKVStorage:
    """K and V slot arrays for all layers, allocated once from a block count."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.device = torch.device(device)
        slots = num_blocks * block_size + 1
        # torch.empty: pages are committed as blocks are first written; only written slots are ever read
        self.k = torch.empty((num_layers, slots, num_kv_heads, head_dim), dtype=dtype, device=self.device)
        self.v = torch.empty((num_layers, slots, num_kv_heads, head_dim), dtype=dtype, device=self.device)
        self.null_slot = slots - 1
        self.k[:, self.null_slot] = 0
        self.v[:, self.null_slot] = 0

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.k.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes of the block slots (the null slot excluded): num_blocks x block_size x bytes/token."""
        return self.num_blocks * self.block_size * self.bytes_per_token


class PagedStepCache:
    """One forward pass's view of paged storage, with the interface `LlamaModel.forward` uses.

    write_slots (N,): where the step's new tokens go, row-major over (B, T).
    read_slots (B, S): the slots each row attends to, in position order, padded with the null
    slot; they include the step's own new tokens (written before they are read).
    """

    def __init__(self, storage: PagedKVStorage, write_slots: torch.Tensor, read_slots: torch.Tensor):
        self.storage, self.write_slots, self.read_slots = storage, write_slots, read_slots
        self.length = read_slots.shape[1] - 1  # only consulted for a default mask; runners pass one

    def reserve(self, n_slots: int) -> None:  # blocks were allocated by the scheduler
        pass

    def advance(self, n: int) -> None:
        pass

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scatter k, v (B, Hkv, T, D) into their slots; gather (B, Hkv, S, D) for attention."""
        b, h, t, d = k.shape
        ks, vs = self.storage.k[layer], self.storage.v[layer]  # (slots, Hkv, D)
        ks.index_copy_(0, self.write_slots, k.transpose(1, 2).reshape(b * t, h, d))
        vs.index_copy_(0, self.write_slots, v.transpose(1, 2).reshape(b * t, h, d))
        s = self.read_slots.shape[1]
        idx = self.read_slots.reshape(-1)
        k_all = ks.index_select(0, idx).view(b, s, h, d).transpose(1, 2)  # (B, Hkv, S, D)
        v_all = vs.index_select(0, idx).view(b, s, h, d).transpose(1, 2)  # (B, Hkv, S, D)
        return k_all, v_all
