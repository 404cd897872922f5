"""Importance eviction on paged blocks: score a prompt while it is prefilled, compress it once.

The engine runs `evict:scorer=...,ratio=R|budget=N,window=W` (decode=false) on paged blocks
the way kvpress compresses a context: the prompt is prefilled with full attention (its blocks
are ordinary prefix-cache blocks, shareable), and once its last token is computed each layer
and KV head keeps its best-scored tokens plus the last `window` (`selectors.keep_index`),
copied in order into fresh blocks that belong to the sequence alone. Generation attends to
those and appends after them. Keys are rotated before they are stored, so positions stay
absolute: a token at position p sits at slot p - evicted.

Scorers: `knorm` (low key norm, from the stored keys), `snapkv` (attention the last `window`
prompt queries pay, pooled), `h2o` (attention from every prompt query). `PromptScores` adds up
the attention of the observed queries chunk by chunk; the sums equal one pass over the whole
prompt, so what is kept does not depend on how the prompt was chunked. Queries of cached
blocks are never computed, so snapkv leaves the last `window` prompt tokens to compute and h2o
takes no prefix-cache hits (`prefix_hit_limit`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache.cache.policies.selectors import attention_mass, evict_target, keep_index, knorm_score, snapkv_pool


@dataclass(frozen=True)
class PagedEvict:
    """The settings of an `evict` policy the paged engine runs (once, after the prompt)."""

    scorer: str  # knorm | snapkv | h2o
    ratio: float  # fraction removed (or 0)
    budget: int  # tokens kept (or 0)
    window: int  # recent prompt tokens always kept; snapkv's observation window
    pool: int = 31  # snapkv's smoothing kernel (odd)

    @classmethod
    def from_part(cls, part) -> "PagedEvict":
        p = part.params
        return cls(p["scorer"], p["ratio"], p["budget"], p["window"], p["pool"])

    def target(self, prompt_tokens: int) -> int:
        """Tokens of the prompt kept (all of a prompt no longer than that)."""
        return min(evict_target(self.ratio, self.budget, prompt_tokens), prompt_tokens)

    @property
    def needs_queries(self) -> bool:
        return self.scorer != "knorm"

    def first_observed(self, prompt_tokens: int) -> int:
        """Position of the first prompt query whose attention is scored."""
        return max(0, prompt_tokens - self.window) if self.scorer == "snapkv" else 0

    def prefix_hit_limit(self, prompt_tokens: int) -> int | None:
        """The most prompt tokens a prefix-cache hit may cover (their queries are never
        computed), or None for no limit."""
        return None if not self.needs_queries else self.first_observed(prompt_tokens)


class PromptScores:
    """Attention mass per layer, KV head and prompt token, summed over the prefill chunks."""

    def __init__(self, spec: PagedEvict, prompt_tokens: int, num_layers: int):
        self.spec, self.prompt_tokens = spec, prompt_tokens
        self.first = spec.first_observed(prompt_tokens)
        self.mass: list[torch.Tensor | None] = [None] * num_layers  # (Hkv, prompt_tokens) fp32

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, start: int) -> None:
        """q (1, Hq, T, D): the chunk's queries at positions start.. ; k (1, Hkv, S, D): every key
        up to the chunk's end (S = start + T)."""
        lo = max(0, self.first - start)
        if lo >= q.shape[2]:
            return
        mass = attention_mass(q[:, :, lo:], k)[0]  # (Hkv, S)
        if self.mass[layer] is None:
            self.mass[layer] = torch.zeros(mass.shape[0], self.prompt_tokens, device=mass.device)
        self.mass[layer][:, : mass.shape[1]] += mass

    def keep(self, layer: int, keys: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt positions to keep in `layer`, per KV head, in order: (Hkv, target). knorm
        scores the layer's prompt keys (Hkv, prompt_tokens, D)."""
        spec, n = self.spec, self.prompt_tokens
        if spec.scorer == "knorm":
            score = knorm_score(keys)  # (Hkv, n)
        else:
            score = self.mass[layer]
            score = snapkv_pool(score[None], spec.pool)[0] if spec.scorer == "snapkv" else score  # (Hkv, n)
        return keep_index(score[None], spec.target(n), spec.window)[0]  # (Hkv, target)
