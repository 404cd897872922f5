"""How a policy cache holds the tokens it keeps: the `ExactStore` (model dtype, dense).

A store is per sequence (batch 1 in practice) and holds, for every layer, K and V of the
tokens kept, in order. Each layer has its own storage (B, Hkv, cap_l, D), written in place
and doubled when it fills, and its own length: an eviction scorer may keep a different
number of tokens in each layer (`Scorer.layer_targets`), and a layer that keeps fewer
holds fewer bytes. The policy cache appends a step's K/V layer by layer (`append`, then
`read` for attention), commits with `advance` (the same t tokens in every layer), and
applies eviction with `drop_range` (a contiguous run, same for all layers) or `gather`
(per layer and head indices). Quantized and tiered stores live in `quantized_store.py`,
keep the same interface and hold as many tokens in every layer (`first` / `extend` move
their exact tokens in and out of the quantized part).
"""

from __future__ import annotations

import torch


class ExactStore:
    """Every kept token's K and V in the model's dtype, each layer with its own length."""

    kind = "full"

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, capacity: int = 256):
        self.num_layers, self.batch, self.num_kv_heads, self.head_dim = num_layers, batch, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        shape = (batch, num_kv_heads, max(capacity, 1), head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]  # L x (B, Hkv, cap, D)
        self.v = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]  # L x (B, Hkv, cap, D)
        self.layer_lengths = [0] * num_layers  # tokens kept in each layer

    @property
    def length(self) -> int:
        """The most tokens a layer keeps (every layer's, unless an eviction kept different numbers)."""
        return max(self.layer_lengths)

    def reserve(self, n_slots: int) -> None:
        """Make room for the tokens up to `n_slots` (counted from `length`) in every layer."""
        more = n_slots - self.length
        for layer, n in enumerate(self.layer_lengths):
            cap = self.k[layer].shape[2]
            if n + more > cap:
                new_cap = max(n + more, 2 * cap)
                self.k[layer] = self._moved(self.k[layer], n, new_cap)
                self.v[layer] = self._moved(self.v[layer], n, new_cap)

    def _moved(self, old: torch.Tensor, n: int, cap: int) -> torch.Tensor:
        new = torch.empty(old.shape[:2] + (cap, old.shape[3]), dtype=old.dtype, device=old.device)  # (B, Hkv, cap, D)
        new[:, :, :n] = old[:, :, :n]
        return new

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stage k, v (B, Hkv, T, D) after the kept tokens of `layer` (committed by `advance`)."""
        n = self.layer_lengths[layer]
        self.k[layer][:, :, n : n + k.shape[2]] = k
        self.v[layer][:, :, n : n + k.shape[2]] = v

    def read(self, layer: int, staged: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V (B, Hkv, S, D) of `layer`: its kept tokens plus `staged` just appended."""
        end = self.layer_lengths[layer] + staged
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Commit the n tokens each layer staged."""
        self.layer_lengths = [m + n for m in self.layer_lengths]

    def first(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V (L, B, Hkv, n, D) of the first n tokens of every layer (all hold at least n)."""
        return torch.stack([k[:, :, :n] for k in self.k]), torch.stack([v[:, :, :n] for v in self.v])

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append and commit k, v (L, B, Hkv, n, D) after the kept tokens of every layer (as many in each)."""
        n = k.shape[3]
        self.reserve(self.length + n)
        for layer in range(self.num_layers):
            self.append(layer, k[layer], v[layer])
        self.advance(n)

    def drop_range(self, start: int, end: int) -> None:
        """Forget tokens [start, end) in every layer; later tokens move down."""
        for layer, length in enumerate(self.layer_lengths):
            n = length - end
            for t in (self.k[layer], self.v[layer]):
                t[:, :, start : start + n] = t[:, :, end:length].clone()
            self.layer_lengths[layer] = length - (end - start)

    def gather(self, index: torch.Tensor | list[torch.Tensor]) -> None:
        """Keep, per layer and head, the tokens at `index[layer]` (B, Hkv, K_l), in that order: an
        (L, B, Hkv, K) tensor, or one per layer where layers keep different numbers. A layer that
        keeps at most half its storage moves to storage of its new size (its bytes shrink with it)."""
        for layer, length in enumerate(self.layer_lengths):
            idx = index[layer]  # (B, Hkv, K_l)
            kept = idx.shape[-1]
            idx = idx[..., None].expand(*idx.shape, self.head_dim)  # (B, Hkv, K_l, D)
            for store in (self.k, self.v):
                rows = torch.gather(store[layer][:, :, :length], 2, idx)  # (B, Hkv, K_l, D)
                if 2 * kept <= store[layer].shape[2]:
                    store[layer] = rows
                else:
                    store[layer][:, :, :kept] = rows
            self.layer_lengths[layer] = kept

    def truncate(self, n: int) -> None:
        """Forget every layer's tokens from `n` on."""
        self.layer_lengths = [min(m, n) for m in self.layer_lengths]

    def clear(self) -> None:
        """Drop every token (keeps the storage for reuse)."""
        self.layer_lengths = [0] * self.num_layers

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token takes held in every layer, K and V."""
        return self.num_layers * self._layer_token_bytes

    @property
    def _layer_token_bytes(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * self.k[0].element_size()  # K and V, one layer

    @property
    def nbytes(self) -> int:
        """Bytes holding the kept tokens (K and V, every layer its own count)."""
        return sum(self.layer_lengths) * self._layer_token_bytes * self.batch

    @property
    def nbytes_allocated(self) -> int:
        """Bytes reserved by the storage (every layer's capacity)."""
        return sum(k.shape[2] for k in self.k) * self._layer_token_bytes * self.batch
