"""TOVA (Oren et al., 2024): keep the tokens the latest query attends to most."""

from __future__ import annotations

import torch

from kvcache.cache.policies.scorers.base import Scorer, attention_mass


class TOVA(Scorer):
    """The attention of the newest query alone (summed over the query heads of a KV head);
    each step's score replaces the last, so with decode=true the policy drops, step by step,
    the tokens the current token looks at least."""

    name = "tova"

    def update(self, prev, q, k) -> torch.Tensor:
        return attention_mass(q[:, :, -1:], k)  # (B, Hkv, S)

    def first_observed(self, prompt_tokens: int) -> int:
        return prompt_tokens - 1
