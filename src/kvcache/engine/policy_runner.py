"""Runs scheduled chunks on per-request policy caches (see `cache.row_policy`).

Each running request owns a one-sequence `SequenceCache`, made at its first chunk and dropped
when it finishes, fails or is preempted. All decode rows (one token each) run as one forward
pass: projections and MLP batched, attention per row over its own cache. A prompt chunk is
computed in pieces that end at multiples of `prefill_piece` (the scheduler cuts chunks only
there), one forward pass each, so a request's cache sees the same pieces however the batch
around it looked: batched, preempted and alone give the same tokens.
"""

from __future__ import annotations

import torch

from kvcache.cache.policies.cache import SequenceCache
from kvcache.cache.policies.grammar import PolicySpec
from kvcache.cache.row_policy import RowsStepView
from kvcache.engine.runner import sample_rows
from kvcache.engine.scheduler import ScheduledChunk
from kvcache.models.llama import LlamaModel
from kvcache.models.step import StepInputs


class PolicyRowRunner:
    """Executes one scheduler step over per-request `SequenceCache`s; returns sampled tokens."""

    def __init__(self, model: LlamaModel, spec: PolicySpec, prefill_piece: int):
        self.model, self.spec, self.prefill_piece = model, spec, prefill_piece
        self.device = model.device
        self.caches: dict[str, SequenceCache] = {}  # request id -> its cache

    def cache_of(self, chunk: ScheduledChunk) -> SequenceCache:
        """The request's cache, made at its first chunk; it has seen exactly the tokens before the chunk."""
        rid = chunk.request.request_id
        cache = self.caches.get(rid)
        if cache is None:
            assert chunk.start == 0, "a per-request cache starts at the sequence's first token"
            cache = self.caches[rid] = SequenceCache(self.model, self.spec)
        assert cache.seen == chunk.start, (cache.seen, chunk.start)
        return cache

    def rename(self, request_id: str, new_id: str) -> None:
        """File a request's cache under another id (kept for, or adopted by, another request)."""
        self.caches[new_id] = self.caches.pop(request_id)

    def forget(self, request_id: str) -> None:
        """Drop a request's cache (finished, failed, aborted or preempted: recomputed from scratch)."""
        self.caches.pop(request_id, None)

    def bytes_held(self, request_id: str) -> int:
        """Bytes the request's cache holds now (0 when it has none)."""
        cache = self.caches.get(request_id)
        return cache.nbytes_used if cache is not None else 0

    def _decode(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        caches = [self.cache_of(c) for c in chunks]
        ids = torch.tensor([[c.request.all_token_ids[c.start]] for c in chunks], device=self.device)  # (B, 1)
        positions = torch.tensor([[c.next_position] for c in caches], device=self.device)  # (B, 1)
        return self.model.forward(StepInputs(ids, positions, 0, None), RowsStepView(caches))  # (B, V)

    def _prefill(self, chunk: ScheduledChunk) -> torch.Tensor:
        cache = self.cache_of(chunk)
        tokens = chunk.request.all_token_ids
        pos, end, piece = chunk.start, chunk.start + chunk.num_tokens, self.prefill_piece
        while pos < end:
            stop = min(end, (pos // piece + 1) * piece)
            ids = torch.tensor([tokens[pos:stop]], device=self.device)  # (1, T)
            logits = self.model.forward(StepInputs(ids, None, cache.next_position, None), cache)  # (1, V)
            pos = stop
        return logits

    def execute(self, chunks: list[ScheduledChunk]) -> dict[str, int]:
        """Run every chunk; sample the next token for those that reached their sequence's end."""
        with torch.inference_mode():
            decodes = [c for c in chunks if c.num_tokens == 1]
            rows: list[tuple[ScheduledChunk, torch.Tensor]] = []
            if decodes:
                logits = self._decode(decodes)
                rows += [(c, logits[b]) for b, c in enumerate(decodes)]
            rows += [(c, self._prefill(c)[0]) for c in chunks if c.num_tokens > 1]
            return sample_rows(rows)
