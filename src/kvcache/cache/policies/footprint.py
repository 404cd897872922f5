"""`PolicyFootprint`: the bytes one sequence's cache holds under a policy, as its store declares them.

Each store class declares its own (`Policy.footprint`: the exact store, quantized codes, tiers);
its selectors bound how many tokens it holds (`Policy.held_cap`), and `row_policy.policy_footprint`
composes the two. The engine sizes per-request caches from it (`row_policy.RowPolicyStorage`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PolicyFootprint:
    """An upper bound on the bytes one sequence's `SequenceCache` holds after n tokens:
    `rate` a token, plus `exact - rate` for each of its exact tokens (at most `exact_tokens`),
    over at most `held_cap` tokens when its selector bounds what it keeps (a window, sinks, a
    budget) and at most `packed_cap` of them packed (`tiered`'s warm tier; the cold one is on
    disk or dropped)."""

    rate: int  # bytes per token of the bulk of the history (packed codes, or the exact store's)
    exact: int  # bytes per exact token (residual tail, sinks; the whole store when it is `full`)
    exact_tokens: int  # the most exact tokens a sequence holds between steps
    held_cap: int | None = None  # the most tokens it holds, or None (all it has seen)
    packed_cap: int | None = None  # the most tokens it holds packed, or None

    def bytes_bound(self, n: int) -> int:
        """The most bytes the cache holds after n tokens."""
        held = n if self.held_cap is None else min(n, self.held_cap)
        exact = min(held, self.exact_tokens)
        packed = held - exact if self.packed_cap is None else min(held - exact, self.packed_cap)
        return exact * self.exact + packed * self.rate

    def slots(self, n: int) -> int:
        """Block slots (tokens at `rate`) a sequence of n tokens is granted; never decreases with n."""
        return -(-self.bytes_bound(n) // self.rate)
