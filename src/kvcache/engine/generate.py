"""Batched generation over a dense KV cache (or without one, recomputing every step).

A ragged batch is left-padded: row b's real tokens start at slot row_start[b]; its RoPE
positions count from 0 there, and a key mask hides the padding, so each row computes
what it would compute alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kvcache.cache.dense import KVCache
from kvcache.engine.detokenizer import IncrementalDetokenizer
from kvcache.engine.outputs import RequestMetrics, RequestOutput
from kvcache.engine.sampling import Sampler, SamplingParams
from kvcache.models.llama import LlamaModel
from kvcache.models.step import StepInputs, causal_mask

PAD_ID = 0


@dataclass
class _Row:
    prompt: list[int]
    params: SamplingParams
    limit: int  # most tokens this row may generate
    sampler: Sampler
    detok: IncrementalDetokenizer
    generated: list[int]
    finish_reason: str | None = None
    t_first: float = 0.0
    t_last: float = 0.0


class BatchGeneration:
    """Generates for several prompts at once; iterate `steps()` for per-token deltas.

    With `cache` given (batch 1), its first `cache.length` slots must hold the K/V of
    prompts[0][:cache.length]; only the rest of the prompt is computed.
    """

    def __init__(self, model: LlamaModel, tokenizer, prompts: list[list[int]], params: list[SamplingParams],
                 max_model_len: int, eos_ids: set[int], use_cache: bool = True, cache: KVCache | None = None):
        self.model, self.use_cache, self.eos_ids = model, use_cache, eos_ids
        self.rows = []
        for ids, p in zip(prompts, params):
            limit = max(0, min(p.max_tokens, max_model_len - len(ids)))
            self.rows.append(_Row(ids, p, limit, Sampler(p, model.device),
                                  IncrementalDetokenizer(tokenizer, p.stop), []))
        self.cached_prompt_tokens = cache.length if cache is not None else 0
        if cache is not None:
            assert len(prompts) == 1 and cache.batch == 1 and cache.length < len(prompts[0])
        longest = max(len(r.prompt) for r in self.rows)
        if use_cache and cache is None:
            cache = model.new_cache(len(self.rows), longest + max(r.limit for r in self.rows))
            cache.row_start = [longest - len(r.prompt) for r in self.rows]
        self.cache = cache
        self.t_start = time.perf_counter()

    # -- one forward --------------------------------------------------------------
    def _prefill(self) -> torch.Tensor:
        cache, dev = self.cache, self.model.device
        if cache is not None and cache.length:  # continue a cached conversation (batch 1)
            ids = torch.tensor([self.rows[0].prompt[cache.length :]], device=dev)  # (1, T)
            step = StepInputs(ids, None, cache.length, causal_mask(None, 1, cache.length, ids.shape[1], dev))
            return self.model.forward(step, cache)
        return self._full_forward([r.prompt for r in self.rows], cache)

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
            return self._full_forward([r.prompt + r.generated for r in self.rows], None)
        cache, dev = self.cache, self.model.device
        ids = torch.tensor([[t] for t in last], device=dev)  # (B, 1)
        key_valid = cache.key_valid(extra=1)
        if key_valid is None:
            step = StepInputs(ids, None, cache.length, None)
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
                seen = torch.tensor(r.prompt + r.generated, device=logits.device)
            out.append(r.sampler(logits[b], seen))
        return out

    def steps(self) -> Iterator[list[tuple[int, str]]]:
        """Run to completion, yielding per step the (row, new text) pairs that produced text."""
        for r in self.rows:
            if r.limit == 0:
                r.finish_reason = "length"
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
                    if not r.generated:
                        r.t_first = now
                    r.t_last = now
                    stop_ids = set(r.params.stop_token_ids) | (set() if r.params.ignore_eos else self.eos_ids)
                    if tok in stop_ids:
                        r.generated.append(tok)
                        r.finish_reason = "stop"
                        continue
                    r.generated.append(tok)
                    delta = r.detok.add(tok)
                    if r.detok.stopped:
                        r.finish_reason = "stop"
                    elif len(r.generated) >= r.limit:
                        r.finish_reason = "length"
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
                logits = self._decode([r.generated[-1] if r.generated else PAD_ID for r in self.rows])

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
        outs = []
        end = time.perf_counter()
        per_token = self.cache.bytes_per_token if self.cache is not None else 0
        for b, r in enumerate(self.rows):
            r.detok.flush()
            n = len(r.generated)
            decode_s = r.t_last - r.t_first
            held = self.cache.row_tokens(b) * per_token if self.cache is not None else 0
            m = RequestMetrics(
                prompt_tokens=len(r.prompt),
                cached_prompt_tokens=self.cached_prompt_tokens if b == 0 else 0,
                generated_tokens=n,
                ttft_s=(r.t_first - self.t_start) if n else 0.0,
                decode_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
                total_s=end - self.t_start,
                kv_cache_bytes=held,
            )
            outs.append(RequestOutput(r.prompt, r.generated, r.detok.text, r.finish_reason or "length", m))
        return outs

    def run(self) -> list[RequestOutput]:
        """Generate to the end and return the outputs."""
        for _ in self.steps():
            pass
        return self.outputs()
