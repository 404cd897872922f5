"""How the paged engine runs a policy on its shared blocks, or that it cannot.

Each policy class says whether its part runs on paged blocks (`Policy.on_paged_blocks`) and,
for a selector, what the engine does there (`Policy.paged_plan`); the engine runs a policy
there when its store does and it has at most one selector that does.
Everything else gets a per-request store (`row_policy.py`). The store declares the blocks'
format and a token's bytes there (`Policy.paged_format`, `Policy.paged_token_bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcache.cache.policies.grammar import PolicyPart, PolicySpec
from kvcache.cache.policies.registry import POLICIES


@dataclass(frozen=True)
class PagedPlan:
    """What the paged engine does for a policy's selector: free blocks behind a window, keep sink
    blocks, compress each prompt once; all None without a selector."""

    window: int | None = None  # `window:size`, or the window of `sinks`
    sinks: tuple[int, int] | None = None  # (n_sink, window)
    evict: PolicyPart | None = None  # the `evict` part (decode=false)


def paged_plan(spec: PolicySpec) -> PagedPlan | None:
    """The plan for `spec`, or None when the paged engine cannot run it on its blocks."""
    parts = [*spec.selectors, spec.store]
    if len(spec.selectors) > 1 or not all(POLICIES[p.name].on_paged_blocks(p.params) for p in parts):
        return None
    sel = spec.selectors[0] if spec.selectors else None
    return PagedPlan(**POLICIES[sel.name].paged_plan(sel)) if sel else PagedPlan()
