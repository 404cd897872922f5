"""Defaults of the model's KV interface (`models.step.StepKV`) for caches that need none of its options.

Besides write/attend/advance, `LlamaModel.forward` asks a cache whether keys should arrive
unrotated (`rotates_keys`: the cache rotates them itself, at positions inside the cache) and
whether it wants to see the step's queries (`observes`, for eviction scorers); plain caches say
no to both. A cache whose `write` hands back the K/V its queries see attends over them with
`attend_written` (its backend's grouped attention, causal unless the step brings a mask).
"""

from __future__ import annotations

import torch

from kvcache.models.step import causal_mask


class StepKVDefaults:
    """Base for caches that store keys as given and never look at queries."""

    rotates_keys = False
    _written: tuple[torch.Tensor, torch.Tensor] | None = None  # what the last `write` returned
    _causal: torch.Tensor | None = None  # the last causal mask `attend_written` built

    def observe(self, layer: int, q, k) -> None:
        """Never called: `observes` is False."""

    def observes(self, t: int) -> bool:
        """Whether the model should pass this step's queries to `observe` (never, here)."""
        return False

    def decode_blocks(self, t: int) -> None:
        """No storage for a fused decode call: the model asks layer by layer."""
        return None

    def kept_for_attention(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hold the K/V (B, Hkv, S, D) `write` returns, for `attend_written`; returns them."""
        self._written = (k, v)
        return k, v

    def attend_written(self, q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q (B, Hq, T, D) over the K/V the last `write` returned, by the store's backend
        (`self.attention`); mask None: causal over them (each layer's own key count, built again
        only where it changes). Returns (B, T, Hq*D)."""
        k, v = self._written
        b, _, t, _ = q.shape
        if mask is None and t > 1:
            s, cached = k.shape[2], self._causal
            if cached is None or cached.shape[0] != b or cached.shape[2:] != (t, s):
                cached = self._causal = causal_mask(None, b, s - t, t, q.device)  # (B, 1, T, S)
            mask = cached
        return self.attention.grouped(q, k, v, mask)
