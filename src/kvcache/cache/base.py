"""What every cache the model's forward pass drives offers besides write/advance.

`LlamaModel.forward` asks a cache two things per step: whether keys should arrive
unrotated (`rotates_keys`: the cache rotates them itself, at positions inside the cache),
and whether it wants to see the step's queries (`observes`, for eviction scorers).
Plain caches say no to both.
"""

from __future__ import annotations


class PlainCache:
    """Base for caches that store keys as given and never look at queries."""

    rotates_keys = False

    def observes(self, t: int) -> bool:
        """Whether the model should pass this step's queries to `observe` (never, here)."""
        return False
