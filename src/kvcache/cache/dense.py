"""The explicit KV cache: per layer K and V of shape (batch, kv_heads, seq, head_dim).

Storage is preallocated for a capacity of token slots and written in place; when a
sequence outgrows it the capacity doubles (one copy), so appends are amortised O(1) and
no step concatenates the history. Rows of a batch share slot indices: a ragged batch is
left-padded, and `row_start[b]` is the first slot that holds a real token of row b.
With an attention backend that reads in place (`cache.attention`, the native kernels), a
single-token step attends straight from the storage (`write` returns None and the model
calls `attend`).
"""

from __future__ import annotations

import torch

from kvcache.cache.attention import TORCH, AttentionBackend, model_attention
from kvcache.cache.base import StepKVDefaults


class KVCache(StepKVDefaults):
    """Dense per-layer K/V storage for a batch of sequences written step by step."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
                 capacity: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 attention: AttentionBackend = TORCH):
        self.num_layers, self.batch, self.num_kv_heads, self.head_dim = num_layers, batch, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        shape = (num_layers, batch, num_kv_heads, max(capacity, 1), head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=self.device)  # (L, B, Hkv, cap, D)
        self.v = torch.empty(shape, dtype=dtype, device=self.device)  # (L, B, Hkv, cap, D)
        self.length = 0  # slots written, shared by all rows
        self.row_start = [0] * batch  # first real slot of each row (left padding before it)
        self.row_end: list[int | None] = [None] * batch  # set when a row finished: slots after it are filler
        self.attention = attention
        self._table = torch.zeros((batch, 1), dtype=torch.int32)  # (B, 1): one "block" 0 spanning the capacity

    @classmethod
    def for_model(cls, model, batch: int, capacity: int) -> KVCache:
        """An empty cache for a `LlamaModel`, sized for `capacity` tokens per row, in its dtype and device."""
        c = model.config
        return cls(c.num_layers, batch, c.num_kv_heads, c.head_dim, capacity, model.dtype, model.device,
                   attention=model_attention(model))

    @property
    def seen(self) -> int:
        """Tokens appended so far (all kept, in a dense cache)."""
        return self.length

    @property
    def next_position(self) -> int:
        """RoPE position of the next token appended (for row 0 / unpadded rows)."""
        return self.length

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reserve(self, n_slots: int) -> None:
        """Make room for at least `n_slots` slots, doubling the capacity as needed."""
        if n_slots <= self.capacity:
            return
        new_cap = max(n_slots, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.empty(old.shape[:3] + (new_cap, old.shape[4]), dtype=old.dtype, device=old.device)
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) at slots [length, length+T) of `layer`; return the
        layer's K, V views over slots [0, length+T) (B, Hkv, S, D). Call `advance(T)` after
        the last layer."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        if self.attention.reads_in_place and k.shape[2] == 1:
            self._written = None
            return None, None  # attend() reads the slots in place: no views, no mask
        return self.kept_for_attention(self.k[layer, :, :, :end], self.v[layer, :, :, :end])

    def attend(self, layer: int, q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of q (B, Hq, T, D) over the layer's slots [0, length+T): a single-token step
        over each row's real slots read in place by the backend (one "block" of the capacity per
        row), else over the views `write` returned, with `mask`. Returns (B, T, Hq*D)."""
        if self._written is not None:
            return self.attend_written(q, mask)
        b, hq, _, d = q.shape
        if layer == 0:  # bounds are the same for every layer of a step
            self._lo = torch.tensor(self.row_start, dtype=torch.int64)  # (B,)
            self._hi = torch.full((b,), self.length + 1, dtype=torch.int64)  # (B,)
        o = self.attention.paged_decode(q.reshape(b, hq, d), self.k[layer], self.v[layer], self._table, self._lo,
                                        self._hi, self.capacity)  # (B, Hq, D)
        return o.view(b, 1, hq * d)

    def advance(self, n: int) -> None:
        """Mark n more slots as written (after all layers stored them)."""
        self.length += n

    def truncate(self, n_slots: int) -> None:
        """Forget everything from slot `n_slots` on (keeps the storage)."""
        if n_slots < 0 or n_slots > self.length:
            raise ValueError(f"Cannot truncate a cache of {self.length} slots to {n_slots}.")
        self.length = n_slots
        self.row_end = [None if e is None or e >= n_slots else e for e in self.row_end]

    def clear(self) -> None:
        """Drop every cached token (keeps the storage for reuse)."""
        self.length = 0
        self.row_start = [0] * self.batch
        self.row_end = [None] * self.batch

    def finish_row(self, row: int) -> None:
        """Row `row` is done: the slots it fills from now on hold no real tokens."""
        if self.row_end[row] is None:
            self.row_end[row] = self.length

    def row_tokens(self, row: int) -> int:
        """Real tokens row `row` holds."""
        end = self.length if self.row_end[row] is None else min(self.row_end[row], self.length)
        return max(0, end - self.row_start[row])

    def key_valid(self, extra: int = 0) -> torch.Tensor | None:
        """Bool (B, length+extra): which slots hold real tokens; None when no row is padded."""
        if not any(self.row_start):
            return None
        slots = torch.arange(self.length + extra, device=self.device)
        starts = torch.tensor(self.row_start, device=self.device)
        return slots[None, :] >= starts[:, None]  # (B, S)

    @property
    def tokens_held(self) -> int:
        """Real (non-padding) tokens stored, summed over rows."""
        return sum(self.row_tokens(b) for b in range(self.batch))

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies over all layers, K and V."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.k.element_size()

    @property
    def nbytes_used(self) -> int:
        """Bytes holding real tokens: equals `cache.spec.kv_bytes` for the same tokens."""
        return self.tokens_held * self.bytes_per_token

    @property
    def nbytes_allocated(self) -> int:
        """Bytes reserved by the storage (capacity x batch, padding included)."""
        return self.k.numel() * self.k.element_size() * 2
