"""Perplexity of a text under a KV policy, and per-token losses for the streaming check.

The tokens go through a fresh `SequenceCache` in chunks of `chunk` tokens (all logits kept),
exactly as a chunked prefill would: the policy evicts / compresses after each chunk, so
every prediction after the first chunk is made from what the policy kept. The loss of
token i+1 is the cross entropy of the logits at token i; perplexity = exp(mean loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvcache.errors import KVCacheError
from kvcache.models.step import StepInputs


@dataclass
class MemorySample:
    """What the cache held after `seen` tokens."""

    seen: int
    held: int
    kv_bytes: int


@dataclass
class TokenLosses:
    """Per-token negative log-likelihoods (nats) of one pass, and the cache along the way."""

    nll: torch.Tensor  # (T-1,) float64: loss of predicting token i+1 from tokens 0..i
    samples: list[MemorySample] = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # the cache's stats() at the end

    def perplexity(self, start: int = 0, end: int | None = None) -> float:
        """exp(mean loss) over predictions start..end-1 (prediction i is of token i+1)."""
        part = self.nll[start:end]
        if part.numel() == 0:
            raise KVCacheError("No predictions in that range.")
        return math.exp(part.mean().item())

    @property
    def peak_kv_bytes(self) -> int:
        return max((s.kv_bytes for s in self.samples), default=0)


def token_losses(llm, ids: list[int], kv_policy: str | None = None, chunk: int = 32,
                 sample_every: int = 1, cache=None,
                 on_chunk: Callable[[int], None] | None = None) -> TokenLosses:
    """Feed `ids` through a fresh policy cache in chunks; the loss of every next-token prediction.

    A memory sample is taken after every `sample_every`-th chunk (and the last). `cache`:
    an empty cache to use instead of `llm.new_policy_cache(kv_policy)` (so that the caller
    can keep decoding from it). `on_chunk(n_tokens)` is called after each chunk.
    """
    if chunk < 1:
        raise KVCacheError(f"chunk must be at least 1, got {chunk}.")
    if len(ids) < 2:
        raise KVCacheError("Perplexity needs at least 2 tokens.")
    cache = cache if cache is not None else llm.new_policy_cache(kv_policy)
    x = torch.tensor([ids], device=llm.device)  # (1, T)
    losses, samples = [], []
    n_chunks = math.ceil(len(ids) / chunk)
    with torch.inference_mode():
        for k, start in enumerate(range(0, len(ids), chunk)):
            piece = x[:, start : start + chunk]  # (1, t)
            logits = llm.model.forward(StepInputs(piece, None, cache.next_position, None, "all"), cache)  # (1, t, V)
            targets = x[0, start + 1 : start + 1 + piece.shape[1]]  # (t,) or (t-1,) at the end
            logits = logits[0, : targets.shape[0]].float()
            losses.append(F.cross_entropy(logits, targets, reduction="none").double())
            if (k + 1) % sample_every == 0 or k == n_chunks - 1:
                samples.append(MemorySample(cache.seen, cache.length, cache.nbytes_used))
            if on_chunk is not None:
                on_chunk(piece.shape[1])
    return TokenLosses(torch.cat(losses), samples, cache.stats())


def perplexity(llm, text: str | list[int], context_len: int, kv_policy: str | None = None, chunk: int = 32,
               windows: int = 1) -> float:
    """exp(mean NLL) over `windows` consecutive, non-overlapping windows of `context_len` tokens
    from the start of `text` (a string, or token ids), each through a fresh policy cache."""
    if context_len < 2:
        raise KVCacheError(f"context_len must be at least 2, got {context_len}.")
    if windows < 1:
        raise KVCacheError(f"windows must be at least 1, got {windows}.")
    ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"] if isinstance(text, str) else list(text)
    if len(ids) < context_len * windows:
        raise KVCacheError(f"The text has {len(ids)} tokens, fewer than {windows} window(s) of {context_len}.")
    nll = [token_losses(llm, ids[w * context_len : (w + 1) * context_len], kv_policy, chunk).nll
           for w in range(windows)]
    return math.exp(torch.cat(nll).mean().item())
