"""The per-request token sampler (greedy, temperature, top-k/p, penalties) over `SamplingParams`."""

from __future__ import annotations

import torch

from kvcache.engine.sampling_params import SamplingParams

__all__ = ["Sampler", "SamplingParams"]


class Sampler:
    """Picks the next token for one request; owns its seeded random generator."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> int:
        """Next token id from logits (V,); `seen` holds prompt + generated ids for the penalty."""
        p = self.params
        logits = logits.float()
        if p.repetition_penalty != 1.0 and seen is not None and seen.numel():
            picked = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if p.greedy:
            return int(logits.argmax())
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
