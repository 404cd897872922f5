"""What a forward pass is given: the step's inputs (`StepInputs`, never global) and the KV store
it reads and writes (`StepKV`, the one interface between the model and every KV layout)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch


@dataclass
class StepInputs:
    """What one forward pass needs besides the weights and the cache.

    input_ids: (B, T) token ids. positions: (B, T) RoPE positions, or None when every row
    uses positions start_pos .. start_pos+T-1. attn_mask: bool (B, 1, T, S) over the
    S = cached + T keys (True = may attend), or None for "everything before and at me"
    (the store builds it over its own keys, or brings masks of its own). logits_at: a step of several
    sequences laid out as one row (`cache.mixed_step`) asks for the logits of their ends.
    """

    input_ids: torch.Tensor  # (B, T)
    positions: torch.Tensor | None  # (B, T)
    start_pos: int
    attn_mask: torch.Tensor | None  # (B, 1, T, S)
    logits_for: str = "last"  # "last" | "all"
    logits_at: torch.Tensor | None = None  # (R,) with B = 1: logits of these positions only, (R, V)


@dataclass
class DecodeBlocks:
    """A decode step's float paged storage, for a model that runs every layer in one native call
    (`models.fused_decode`): the store offers it only where writing and attending are exactly
    "put k, v at their slots; attend over each row's blocks in place" (no policy, no codes, no
    sinks, no observer)."""

    k: torch.Tensor  # (L, Hkv, slots, D) in the model dtype, contiguous
    v: torch.Tensor  # (L, Hkv, slots, D)
    write_slots: torch.Tensor  # (B,) int64: where each row's new token goes
    table: torch.Tensor  # (B, NB) int32: each row's blocks
    lo: torch.Tensor  # (B,) int64: row b attends to tokens lo[b] <= t < hi[b] of its blocks
    hi: torch.Tensor  # (B,) int64
    block_size: int


@runtime_checkable
class StepKV(Protocol):
    """What `LlamaModel.forward` asks of the KV store it runs a step against.

    Per step: `reserve(length + T)`; per layer, `write` the step's keys and values (getting back
    the K/V the queries will see, or (None, None) where the store reads them in place), `observe`
    the queries when `observes(T)` (eviction scorers), and `attend`: the store always computes the
    layer's attention, through the attention backend it was built with (`cache.attention`); after
    the last layer, `advance(T)`. A store of plain float
    blocks may instead hand a decode step its storage (`decode_blocks`) for one fused call. The dense cache, the
    policy cache and every paged step view implement it; nothing else is probed.
    """

    rotates_keys: ClassVar[bool] | bool  # keys arrive unrotated: the store rotates them at its own positions

    @property
    def length(self) -> int:
        """Tokens before this step, the most of any layer (room is reserved from it); a store may
        keep fewer in some layers: the store builds each layer's causal mask from the keys `write`
        returns for it, so a layer's mask starts at its own count."""

    def reserve(self, n_slots: int) -> None:
        """Make room for `n_slots` tokens in all."""

    def observes(self, t: int) -> bool:
        """Whether the model passes this step's queries to `observe`."""

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """A layer's queries q (B, Hq, T, D) and the keys k (B, Hkv, S, D) they attend to."""

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Store k, v (B, Hkv, T, D); return the K, V (B, Hkv, S, D) the queries will see, or
        (None, None) where the store reads them in place."""

    def attend(self, layer: int, q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of q (B, Hq, T, D) over the layer's store: (B, T, Hq*D). `mask`: the step's
        bool mask (B, 1, T, S) over the K/V `write` returned, or None for causal; a store that
        brings its own masks or reads its blocks in place ignores it."""

    def advance(self, t: int) -> None:
        """Commit the step's t tokens."""

    def decode_blocks(self, t: int) -> DecodeBlocks | None:
        """The store's blocks for a step of t tokens per row run in one native call, or None where
        the store must be asked layer by layer (`write`, `attend`)."""


def causal_mask(key_valid: torch.Tensor | None, batch: int, start: int, t: int, device) -> torch.Tensor | None:
    """Bool (B, 1, T, start+T) mask for T new queries at slots start.. over all keys so far.

    A query sees keys at or before its slot that are valid; it always sees itself, so a
    padding query never has an empty row (which would turn into NaN).
    Returns None when a single query may see everything (plain decode, no padding).
    """
    s = start + t
    if t == 1 and key_valid is None:
        return None
    q_slot = torch.arange(start, s, device=device)[:, None]  # (T, 1)
    k_slot = torch.arange(s, device=device)[None, :]  # (1, S)
    allowed = (k_slot <= q_slot)[None]  # (1, T, S)
    if key_valid is not None:
        allowed = (allowed & key_valid[:, None, :]) | (k_slot == q_slot)[None]  # (B, T, S)
    return allowed.expand(batch, t, s)[:, None]  # (B, 1, T, S)
