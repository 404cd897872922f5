"""What a token selector is: how a policy chooses which tokens a cache keeps.

The selectors themselves are policy classes in their own files (`window.py`, `sinks.py`,
`evict.py`).

A selector never touches storage: after each step it returns a `KeepPlan` (a contiguous
run to drop, or per-layer/per-head indices to keep, as many in each layer or a different
number per layer) or None, and the cache applies it to
its store (or, for a window in the paged engine, the engine frees whole blocks). Eviction
happens in steps of `unit` tokens (a block), so the resident memory of `window:size=N`
stays within N + unit - 1 tokens and the copy is amortised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


EVICT_UNIT = 16  # tokens; one paged block


@dataclass
class KeepPlan:
    """Drop tokens [drop_start, drop_end) everywhere, or keep `index` per layer and head: (L, B, Hkv, K)
    when every layer keeps K, else a list of L tensors (B, Hkv, K_l) (`Scorer.ragged_layers`)."""

    drop_start: int = 0
    drop_end: int = 0
    index: torch.Tensor | list[torch.Tensor] | None = None


class Selector:
    """Base: keeps everything."""

    cache_positions = False  # True: RoPE positions are slots inside the cache (StreamingLLM)

    def observes(self, t: int) -> bool:
        """Whether this step's queries are needed (see `observe`)."""
        return False

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """See a layer's queries q (B, Hq, T, D) and keys k (B, Hkv, S, D) of this step."""

    def plan(self, held: int, seen: int, t: int, unit: int, keys) -> KeepPlan | None:
        """After a step of t tokens: what to drop, given `held` tokens kept of `seen`."""
        return None

    def kept(self, plan: KeepPlan, held_before: int) -> None:
        """The cache applied `plan` (this or another selector's): realign per-token state."""


def evict_target(ratio: float, budget: int, seen: int) -> int:
    """Tokens an `evict` policy keeps of `seen`: its budget, or the (1 - ratio) share (at least 1)."""
    kept = budget if budget else math.ceil((1.0 - ratio) * seen)
    return max(kept, 1)


def keep_index(score: torch.Tensor, target: int, window: int) -> torch.Tensor:
    """Which of `held` tokens to keep, score (B, Hkv, held): the last min(window, target), and
    the best-scored of the rest up to `target` in all, in order. Returns (B, Hkv, target)."""
    held = score.shape[2]
    recent = min(window, target)
    n_old, top = held - recent, target - recent
    old = score[:, :, :n_old]  # (B, Hkv, n_old)
    keep_old = old.topk(top, dim=-1).indices.sort(-1).values if top else old[:, :, :0].long()
    tail = torch.arange(n_old, held, device=old.device).expand(*old.shape[:2], recent)
    return torch.cat([keep_old, tail], -1)  # (B, Hkv, target)
