"""knorm: keys with a low L2 norm draw attention (Devoto et al., 2024), so keep those."""

from __future__ import annotations

import torch

from kvcache.cache.policies.scorers.base import Scorer


class Knorm(Scorer):
    """Minus the key norm; needs no queries, so it also runs through `kvcache.hf`."""

    name = "knorm"
    needs_queries = False

    def key_score(self, keys: torch.Tensor) -> torch.Tensor:
        return -keys.float().norm(dim=-1)  # (..., S)
