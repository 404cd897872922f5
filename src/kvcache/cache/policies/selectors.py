"""Token selectors: which tokens a policy cache keeps (window, sinks, importance eviction).

A selector never touches storage: after each step it returns a `KeepPlan` (a contiguous
run to drop, or per-layer/per-head indices to keep) or None, and the cache applies it to
its store (or, for a window in the paged engine, the engine frees whole blocks). Eviction
happens in steps of `unit` tokens (a block), so the resident memory of `window:size=N`
stays within N + unit - 1 tokens and the copy is amortised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvcache.cache.policies.grammar import PolicyPart
from kvcache.cache.policies.scorers import Scorer, make_scorer

EVICT_UNIT = 16  # tokens; one paged block


@dataclass
class KeepPlan:
    """Drop tokens [drop_start, drop_end) everywhere, or keep `index` (L, B, Hkv, K) per layer and head."""

    drop_start: int = 0
    drop_end: int = 0
    index: torch.Tensor | None = None


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


class Window(Selector):
    """Keep the last `size` tokens, dropped a block (`unit` tokens) at a time.

    The first token kept is the block boundary at or before seen - size, counted in
    absolute positions, so the per-sequence cache and the paged engine (which frees whole
    blocks) keep exactly the same tokens.
    """

    def __init__(self, size: int):
        self.size = size

    def first_kept(self, seen: int, unit: int) -> int:
        """Absolute position of the oldest token kept after `seen` tokens."""
        return max(0, (seen - self.size) // unit * unit)

    def plan(self, held, seen, t, unit, keys):
        drop = self.first_kept(seen, unit) - (seen - held)
        return KeepPlan(0, drop) if drop > 0 else None


class Sinks(Window):
    """StreamingLLM: the first `n_sink` tokens plus the last `window`, at cache positions."""

    cache_positions = True

    def __init__(self, n_sink: int, window: int):
        super().__init__(window)
        self.n_sink = n_sink

    def sink_blocks(self, unit: int) -> int:
        """Leading blocks of `unit` tokens that hold the sinks (never released)."""
        return -(-self.n_sink // unit)

    def window_start(self, position: int, unit: int) -> int:
        """Absolute position of the oldest window token the query at `position` sees."""
        return max(self.n_sink, self.first_kept(position, unit))

    def plan(self, held, seen, t, unit, keys):
        if held <= self.n_sink:
            return None
        first_held = seen - (held - self.n_sink)  # absolute position of the oldest window token
        drop = max(self.n_sink, self.first_kept(seen, unit)) - first_held
        return KeepPlan(self.n_sink, self.n_sink + drop) if drop > 0 else None


class Evict(Selector):
    """Keep the tokens that matter: top scores per layer and KV head, plus the last `window`.

    The `scorer` (`scorers/`, one class each) ranks the held tokens: from each step's queries
    (`Scorer.update`) or from the keys alone (`Scorer.key_score`). Runs after each prompt chunk
    (t > 1), and with decode=true also while generating. `ratio` is the fraction removed;
    `budget` the tokens kept.
    """

    def __init__(self, scorer: Scorer, ratio: float, budget: int, window: int, decode: bool, num_layers: int):
        self.scorer, self.ratio, self.budget, self.window, self.decode = scorer, ratio, budget, window, decode
        self.scores: list[torch.Tensor | None] = [None] * num_layers  # (B, Hkv, S) float32 per layer

    def target(self, seen: int) -> int:
        return evict_target(self.ratio, self.budget, seen)

    def observes(self, t: int) -> bool:
        return self.scorer.needs_queries and (t > 1 or self.decode)

    def observe(self, layer, q, k):
        self.scores[layer] = self.scorer.update(self.scores[layer], q, k)  # (B, Hkv, S)

    def plan(self, held, seen, t, unit, keys):
        if t == 1 and not self.decode:
            return None
        target = self.target(seen)
        slack = unit - 1 if t == 1 else 0
        if held <= target + slack:
            return None
        per_layer = [keep_index(score, target, self.window) for score in self._layer_scores(held, keys)]
        return KeepPlan(index=torch.stack(per_layer))  # (L, B, Hkv, target)

    def _layer_scores(self, held: int, keys):
        for layer in range(len(self.scores)):
            if not self.scorer.needs_queries:
                k, _ = keys(layer)
                yield self.scorer.key_score(k)  # (B, Hkv, S)
            else:
                yield self.scores[layer][:, :, :held]

    def kept(self, plan, held_before):
        for layer, s in enumerate(self.scores):
            if s is None:
                continue
            if plan.index is not None:
                self.scores[layer] = torch.gather(s[:, :, :held_before], 2, plan.index[layer])
            else:
                self.scores[layer] = torch.cat([s[:, :, : plan.drop_start], s[:, :, plan.drop_end : held_before]], 2)


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


def make_selector(part: PolicyPart, num_layers: int, device: torch.device) -> Selector:
    p = part.params
    if part.name == "window":
        return Window(p["size"])
    if part.name == "sinks":
        return Sinks(p["n_sink"], p["window"])
    if part.name == "evict":
        return Evict(make_scorer(p), p["ratio"], p["budget"], p["window"], p["decode"], num_layers)
    raise AssertionError(part.name)
