"""How a policy cache holds the tokens it keeps: the `ExactStore` (model dtype, dense).

A store is per sequence (batch 1 in practice) and holds, for every layer, K and V of the
tokens kept, in order, as (L, B, Hkv, cap, D) storage written in place (the dense
`KVCache`'s storage, whose growth and append it reuses). The policy cache appends a step's
K/V layer by layer (`append`, then `read` for attention), commits with `advance`, and
applies eviction with `drop_range` (a contiguous run, same for all layers) or `gather`
(per layer and head indices). Quantized and tiered stores live in `quantized_store.py`
and keep the same interface.
"""

from __future__ import annotations

import torch

from kvcache.cache.dense import KVCache


class ExactStore(KVCache):
    """Every kept token's K and V in the model's dtype."""

    kind = "full"

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, capacity: int = 256):
        super().__init__(num_layers, batch, num_kv_heads, head_dim, capacity, dtype, device)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stage k, v (B, Hkv, T, D) after the kept tokens of `layer` (committed by `advance`)."""
        self.write(layer, k, v)

    def read(self, layer: int, staged: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V (B, Hkv, S, D) of `layer`: the kept tokens plus `staged` just appended."""
        end = self.length + staged
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

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
        super().truncate(min(self.length, n))

    @property
    def nbytes(self) -> int:
        """Bytes holding the kept tokens (K and V, all layers)."""
        return self.length * self.bytes_per_token * self.batch
