"""Per-step inputs of a forward pass, passed explicitly (never global)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepInputs:
    """What one forward pass needs besides the weights and the cache.

    input_ids: (B, T) token ids. positions: (B, T) RoPE positions, or None when every row
    uses positions start_pos .. start_pos+T-1. attn_mask: bool (B, 1, T, S) over the
    S = cached + T keys (True = may attend), or None for "everything before and at me"
    (a cache with `masks_itself` brings its own masks). logits_at: a step of several
    sequences laid out as one row (`cache.mixed_step`) asks for the logits of their ends.
    """

    input_ids: torch.Tensor  # (B, T)
    positions: torch.Tensor | None  # (B, T)
    start_pos: int
    attn_mask: torch.Tensor | None  # (B, 1, T, S)
    logits_for: str = "last"  # "last" | "all"
    logits_at: torch.Tensor | None = None  # (R,) with B = 1: logits of these positions only, (R, V)


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
