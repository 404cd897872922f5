"""H2O (Zhang et al., 2023): heavy hitters, the keys that gathered the most attention so far."""

from __future__ import annotations

import torch

from kvcache.cache.policies.scorers.base import Scorer, accumulate, attention_mass


class H2O(Scorer):
    """Attention summed over every query seen (each prompt query, then each decoded one)."""

    name = "h2o"

    def update(self, prev, q, k) -> torch.Tensor:
        return accumulate(prev, attention_mass(q, k))  # (B, Hkv, S)
