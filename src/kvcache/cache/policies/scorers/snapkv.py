"""SnapKV (Li et al., 2024): the attention the last `window` prompt queries pay, pooled."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvcache.cache.policies.scorers.base import Scorer, accumulate, attention_mass


class SnapKV(Scorer):
    """A prompt chunk's last `window` queries score the keys; the mass is smoothed over `pool`
    neighbouring keys (odd), so a kept key brings the tokens around it. Decoded queries add on."""

    name = "snapkv"

    def update(self, prev, q, k) -> torch.Tensor:
        if q.shape[2] > 1:  # a prompt chunk: its observation window replaces the score
            return self.prompt_score(attention_mass(q[:, :, -self.window :], k))
        return accumulate(prev, attention_mass(q, k))  # (B, Hkv, S)

    def first_observed(self, prompt_tokens: int) -> int:
        return max(0, prompt_tokens - self.window)

    def prompt_score(self, mass: torch.Tensor) -> torch.Tensor:
        return F.avg_pool1d(mass, kernel_size=self.pool, stride=1, padding=self.pool // 2, count_include_pad=False)
