"""`window:size=N`: keep the last N tokens."""

from __future__ import annotations

from typing import ClassVar

from kvcache.cache.policies.base import Policy
from kvcache.cache.policies.params import Param
from kvcache.cache.policies.selectors import KeepPlan, Selector


class Window(Selector, Policy):
    """Keep the last `size` tokens, dropped a block (`unit` tokens) at a time.

    The first token kept is the block boundary at or before seen - size, counted in
    absolute positions, so the per-sequence cache and the paged engine (which frees whole
    blocks) keep exactly the same tokens.
    """

    name = "window"
    role = "selector"
    params: ClassVar[dict[str, Param]] = {"size": Param(int, 1024, minimum=1)}
    examples = ("window:size=32",)

    def __init__(self, size: int):
        self.size = size

    @classmethod
    def from_params(cls, params: dict, num_layers: int) -> "Window":
        return cls(params["size"])

    @classmethod
    def on_paged_blocks(cls, params: dict) -> bool:
        return True  # whole blocks are freed as the window passes them

    @classmethod
    def paged_plan(cls, part) -> dict:
        return {"window": part.params["size"]}

    @classmethod
    def held_cap(cls, params: dict, slack: int, num_layers: int) -> int | None:
        return params["size"] + slack

    def first_kept(self, seen: int, unit: int) -> int:
        """Absolute position of the oldest token kept after `seen` tokens."""
        return max(0, (seen - self.size) // unit * unit)

    def plan(self, held, seen, t, unit, keys):
        drop = self.first_kept(seen, unit) - (seen - held)
        return KeepPlan(0, drop) if drop > 0 else None
