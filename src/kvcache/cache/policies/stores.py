"""How a policy cache holds the tokens it keeps: the `ExactStore` (model dtype, dense).

A store is per sequence (batch 1 in practice) and holds, for every layer, K and V of the
tokens kept, in order, as (L, B, Hkv, cap, D) storage written in place. The policy cache
appends a step's K/V layer by layer (`append`, then `read` for attention), commits with
`advance`, and applies eviction with `drop_range` (a contiguous run, same for all layers)
or `gather` (per layer and head indices). Quantized and tiered stores live in
`quantized_store.py` and keep the same interface.
"""

from __future__ import annotations

import torch


class ExactStore:
    """Every kept token's K and V in the model's dtype."""

    kind = "full"

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, capacity: int = 256):
        self.num_layers, self.batch, self.num_kv_heads, self.head_dim = num_layers, batch, num_kv_heads, head_dim
        self.dtype, self.device = dtype, device
        shape = (num_layers, batch, num_kv_heads, max(capacity, 1), head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)  # (L, B, Hkv, cap, D)
        self.v = torch.empty(shape, dtype=dtype, device=device)  # (L, B, Hkv, cap, D)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reserve(self, n_tokens: int) -> None:
        """Room for n_tokens, doubling the storage when needed (one copy)."""
        if n_tokens <= self.capacity:
            return
        cap = max(n_tokens, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.empty(old.shape[:3] + (cap, old.shape[4]), dtype=old.dtype, device=old.device)
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stage k, v (B, Hkv, T, D) after the kept tokens of `layer` (committed by `advance`)."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v

    def read(self, layer: int, staged: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V (B, Hkv, S, D) of `layer`: the kept tokens plus `staged` just appended."""
        end = self.length + staged
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def drop_range(self, start: int, end: int) -> None:
        """Forget tokens [start, end) in every layer; later tokens move down."""
        n = self.length - end
        for t in (self.k, self.v):
            t[:, :, :, start : start + n] = t[:, :, :, end : self.length].clone()
        self.length -= end - start

    def gather(self, index: torch.Tensor) -> None:
        """Keep, per layer and head, the tokens at `index` (L, B, Hkv, K), in that order."""
        kept = index.shape[-1]
        idx = index[..., None].expand(*index.shape, self.head_dim)  # (L, B, Hkv, K, D)
        for t in (self.k, self.v):
            t[:, :, :, :kept] = torch.gather(t[:, :, :, : self.length], 3, idx)
        self.length = kept

    def truncate(self, n: int) -> None:
        self.length = min(self.length, n)

    def clear(self) -> None:
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes holding the kept tokens (K and V, all layers)."""
        return self.length * self.bytes_per_token * self.batch

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.k.element_size()

    @property
    def nbytes_allocated(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
