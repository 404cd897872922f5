"""Importance eviction on paged blocks: score a prompt while it is prefilled, compress it once.

The engine runs `evict:scorer=...,ratio=R|budget=N,window=W` (decode=false) on paged blocks
the way kvpress compresses a context: the prompt is prefilled with full attention (its blocks
are ordinary prefix-cache blocks, shareable), and once its last token is computed each layer
and KV head keeps its best-scored tokens plus the last `window` (`selectors.keep_index`),
copied in order into fresh blocks that belong to the sequence alone. Generation attends to
those and appends after them. Keys are rotated before they are stored, so positions stay
absolute: a token at position p sits at slot p - evicted.

The scorer (`policies/scorers/`) names the prompt queries it observes (`first_observed`: all
of them for h2o, the last `window` for snapkv) and turns their attention
into a score (`prompt_score`), or scores the stored keys alone (knorm). `PromptScores` adds up
the attention of the observed queries chunk by chunk; the sums equal one pass over the whole
prompt, so what is kept does not depend on how the prompt was chunked. Queries of cached
blocks are never computed, so a prefix-cache hit may cover only the prompt before the first
observed query (`prefix_hit_limit`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcache.cache.policies.scorers import Scorer, attention_mass, make_scorer
from kvcache.cache.policies.selectors import evict_target, keep_index


@dataclass(frozen=True)
class PagedEvict:
    """The settings of an `evict` policy the paged engine runs (once, after the prompt)."""

    scorer: Scorer  # ranks the prompt's tokens (policies/scorers/)
    ratio: float  # fraction removed (or 0)
    budget: int  # tokens kept (or 0)
    window: int  # recent prompt tokens always kept (and the scorer's observation window)

    @classmethod
    def from_part(cls, part) -> "PagedEvict":
        p = part.params
        return cls(make_scorer(p), p["ratio"], p["budget"], p["window"])

    def target(self, prompt_tokens: int) -> int:
        """Tokens of the prompt kept (all of a prompt no longer than that)."""
        return min(evict_target(self.ratio, self.budget, prompt_tokens), prompt_tokens)

    @property
    def needs_queries(self) -> bool:
        return self.scorer.needs_queries

    def prefix_hit_limit(self, prompt_tokens: int) -> int | None:
        """The most prompt tokens a prefix-cache hit may cover (their queries are never
        computed), or None for no limit."""
        return self.scorer.first_observed(prompt_tokens) if self.needs_queries else None


class PromptScores:
    """Attention mass per layer, KV head and prompt token, summed over the prefill chunks."""

    def __init__(self, spec: PagedEvict, prompt_tokens: int, num_layers: int):
        self.spec, self.prompt_tokens = spec, prompt_tokens
        self.first = spec.scorer.first_observed(prompt_tokens)
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
        """Prompt positions to keep in `layer`, per KV head, in order: (Hkv, target). A scorer
        that needs no queries scores the layer's prompt keys (Hkv, prompt_tokens, D)."""
        spec, n = self.spec, self.prompt_tokens
        if not spec.needs_queries:
            score = spec.scorer.key_score(keys)[None]  # (1, Hkv, n)
        else:
            score = spec.scorer.prompt_score(self.mass[layer][None])  # (1, Hkv, n)
        return keep_index(score, spec.target(n), spec.window)[0]  # (Hkv, target)
