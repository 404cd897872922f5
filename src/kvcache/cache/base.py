"""Defaults of the model's KV interface (`models.step.StepKV`) for caches that need none of its options.

Besides write/attend/advance, `LlamaModel.forward` asks a cache whether keys should arrive
unrotated (`rotates_keys`: the cache rotates them itself, at positions inside the cache),
whether it brings its own masks (`masks_itself`) and whether it wants to see the step's
queries (`observes`, for eviction scorers). Plain caches say no to all three.
"""

from __future__ import annotations


class StepKVDefaults:
    """Base for caches that store keys as given and never look at queries."""

    rotates_keys = False
    masks_itself = False

    def observe(self, layer: int, q, k) -> None:
        """Never called: `observes` is False."""

    def observes(self, t: int) -> bool:
        """Whether the model should pass this step's queries to `observe` (never, here)."""
        return False

    def decode_blocks(self, t: int) -> None:
        """No storage for a fused decode call: the model asks layer by layer."""
        return None
