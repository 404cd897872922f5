"""`sinks:n_sink=S,window=W`: StreamingLLM, the first S tokens plus the last W."""

from __future__ import annotations

from typing import ClassVar

from kvcache.cache.policies.params import Param
from kvcache.cache.policies.selectors import KeepPlan
from kvcache.cache.policies.window import Window


class Sinks(Window):
    """StreamingLLM: the first `n_sink` tokens plus the last `window`, at cache positions."""

    name = "sinks"
    params: ClassVar[dict[str, Param]] = {"n_sink": Param(int, 4, minimum=0), "window": Param(int, 1020, minimum=1)}
    cache_positions = True
    examples = ("sinks:n_sink=4,window=24", "sinks:n_sink=4,window=28+quantized:bits=8,group_size=16,residual=16")

    def __init__(self, n_sink: int, window: int):
        super().__init__(window)
        self.n_sink = n_sink

    @classmethod
    def from_params(cls, params: dict, num_layers: int) -> "Sinks":
        return cls(params["n_sink"], params["window"])

    @classmethod
    def paged_plan(cls, part) -> dict:
        p = part.params
        return {"window": p["window"], "sinks": (p["n_sink"], p["window"])}

    @classmethod
    def held_cap(cls, params: dict, slack: int, num_layers: int) -> int | None:
        return params["n_sink"] + params["window"] + slack

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
