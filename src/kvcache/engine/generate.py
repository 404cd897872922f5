"""Batched generation over a dense KV cache (or without one, recomputing every step).

A ragged batch is left-padded: row b's real tokens start at slot row_start[b]; its RoPE
positions count from 0 there, and a key mask hides the padding, so each row computes
what it would compute alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from kvcache.cache.dense import KVCache
from kvcache.engine.detokenizer import IncrementalDetokenizer
from kvcache.engine.outputs import RequestOutput
from kvcache.engine.request import Request, Status
from kvcache.engine.sampling import Sampler, SamplingParams
from kvcache.models.llama import LlamaModel
from kvcache.models.step import StepInputs, causal_mask

PAD_ID = 0


class BatchGeneration:
    """Generates for several prompts at once; iterate `steps()` for per-token deltas.

    Each row is a `Request` (the engine's own request state: token bookkeeping, stop rules,
    metrics), so both paths finish and report requests the same way.
    With `cache` given (batch 1: a `KVCache` or a `SequenceCache`), it must have seen
    prompts[0][:cache.seen]; only the rest of the prompt is computed.
    """

    def __init__(self, model: LlamaModel, tokenizer, prompts: list[list[int]], params: list[SamplingParams],
                 max_model_len: int, eos_ids: set[int], use_cache: bool = True, cache: KVCache | None = None):
        self.model, self.use_cache = model, use_cache
        self.t_start = time.perf_counter()
        self.rows = [
            Request(f"row-{b}", ids, p, Sampler(p, model.device), IncrementalDetokenizer(tokenizer, p.stop),
                    max_model_len, frozenset(eos_ids), arrival=self.t_start, status=Status.RUNNING,
                    num_cached_tokens=0)
            for b, (ids, p) in enumerate(zip(prompts, params))
        ]
        if cache is not None:
            assert len(prompts) == 1 and cache.batch == 1 and cache.seen < len(prompts[0])
            self.rows[0].num_cached_tokens = cache.seen
        longest = max(len(ids) for ids in prompts)
        if use_cache and cache is None:
            most_new = max(min(p.max_tokens, max_model_len - len(ids)) for ids, p in zip(prompts, params))
            cache = KVCache.for_model(model, len(self.rows), longest + max(0, most_new))
            cache.row_start = [longest - len(ids) for ids in prompts]
        self.cache = cache

    # -- one forward --------------------------------------------------------------
    def _prefill(self) -> torch.Tensor:
        cache, dev = self.cache, self.model.device
        if cache is not None and cache.seen:  # continue a cached conversation (batch 1)
            ids = torch.tensor([self.rows[0].prompt_token_ids[cache.seen :]], device=dev)  # (1, T)
            step = StepInputs(ids, None, cache.next_position, causal_mask(None, 1, cache.length, ids.shape[1], dev))
            return self.model.forward(step, cache)
        return self._full_forward([r.prompt_token_ids for r in self.rows], cache)

    def _full_forward(self, seqs: list[list[int]], cache: KVCache | None) -> torch.Tensor:
        """Forward over whole left-padded sequences, from slot 0."""
        dev = self.model.device
        longest = max(len(s) for s in seqs)
        starts = [longest - len(s) for s in seqs]
        ids = torch.tensor([[PAD_ID] * st + s for st, s in zip(starts, seqs)], device=dev)  # (B, T)
        if any(starts):
            offs = torch.tensor(starts, device=dev)[:, None]
            positions = (torch.arange(longest, device=dev)[None] - offs).clamp_(min=0)  # (B, T)
            key_valid = torch.arange(longest, device=dev)[None] >= offs  # (B, T)
        else:
            positions, key_valid = None, None
        mask = causal_mask(key_valid, len(seqs), 0, longest, dev)
        return self.model.forward(StepInputs(ids, positions, 0, mask), cache)

    def _decode(self, last: list[int]) -> torch.Tensor:
        if not self.use_cache:
            return self._full_forward([r.all_token_ids for r in self.rows], None)
        cache, dev = self.cache, self.model.device
        ids = torch.tensor([[t] for t in last], device=dev)  # (B, 1)
        key_valid = cache.key_valid(extra=1)
        if key_valid is None:
            step = StepInputs(ids, None, cache.next_position, None)
        else:
            pos = torch.tensor([[cache.length - s] for s in cache.row_start], device=dev)  # (B, 1)
            step = StepInputs(ids, pos, cache.length, causal_mask(key_valid, len(last), cache.length, 1, dev))
        return self.model.forward(step, cache)

    # -- the loop -----------------------------------------------------------------
    def _sample(self, logits: torch.Tensor) -> list[int]:
        rows = self.rows
        if all(r.params.greedy and r.params.repetition_penalty == 1.0 for r in rows):
            return logits.argmax(-1).tolist()
        out = []
        for b, r in enumerate(rows):
            seen = None
            if r.params.repetition_penalty != 1.0:
                seen = torch.tensor(r.all_token_ids, device=logits.device)
            out.append(r.sampler(logits[b], seen))
        return out

    def steps(self) -> Iterator[list[tuple[int, str]]]:
        """Run to completion, yielding per step the (row, new text) pairs that produced text."""
        for r in self.rows:
            if r.num_tokens >= r.max_total_tokens:
                r.finish_reason = "length"  # no room left to generate
        if all(r.finish_reason for r in self.rows):
            return
        with torch.inference_mode():
            logits = self._prefill()
            while True:
                tokens = self._sample(logits)
                now = time.perf_counter()
                deltas = []
                for b, (r, tok) in enumerate(zip(self.rows, tokens)):
                    if r.finish_reason:
                        continue
                    delta = r.append_token(tok, now)
                    if delta:
                        deltas.append((b, delta))
                if self.cache is not None:
                    for b, r in enumerate(self.rows):
                        if r.finish_reason:
                            self.cache.finish_row(b)  # its later slots are filler
                if deltas:
                    yield deltas
                if all(r.finish_reason for r in self.rows):
                    break
                logits = self._decode([r.output_token_ids[-1] if r.output_token_ids else PAD_ID for r in self.rows])

    def text_pieces(self) -> Iterator[str]:
        """For a single prompt: its text pieces as produced, then the held-back tail."""
        assert len(self.rows) == 1
        for deltas in self.steps():
            for _, text in deltas:
                yield text
        tail = self.rows[0].detok.flush()
        if tail:
            yield tail

    def outputs(self) -> list[RequestOutput]:
        """Results, after `steps()` is exhausted."""
        per_token = self.cache.bytes_per_token if self.cache is not None else 0
        for b, r in enumerate(self.rows):
            r.detok.flush()
            r.status = Status.FINISHED
            r.kv_bytes = self.cache.row_tokens(b) * per_token if self.cache is not None else 0  # its own tokens
        return [r.to_output() for r in self.rows]

    def run(self) -> list[RequestOutput]:
        """Generate to the end and return the outputs."""
        for _ in self.steps():
            pass
        return self.outputs()
