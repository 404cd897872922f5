"""Turns scheduled chunks into forward passes over paged KV storage, and samples.

All decode rows (one new token each) run as one batch: each row gathers its own slots
(right-padded with the null slot, masked). Each prefill chunk runs as its own pass, causal
from its start position. Per-step inputs travel as `StepInputs` + a `PagedStepCache`.
"""

from __future__ import annotations

import torch

from kvcache.cache.manager import KVCacheManager
from kvcache.cache.storage import PagedKVStorage, PagedStepCache
from kvcache.engine.scheduler import ScheduledChunk
from kvcache.models.llama import LlamaModel
from kvcache.models.step import StepInputs, causal_mask


class ModelRunner:
    """Executes one scheduler step on the model; returns sampled tokens by request id."""

    def __init__(self, model: LlamaModel, storage: PagedKVStorage, kv: KVCacheManager):
        self.model, self.storage, self.kv = model, storage, kv
        self.device = model.device

    def _slot_rows(self, chunks: list[ScheduledChunk], lengths: list[int]) -> torch.Tensor:
        """(B, S_max) slots of positions [0, length_b) per row, padded with the null slot."""
        bs = self.kv.block_size
        tables = [self.kv.block_table(c.request.request_id) for c in chunks]
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=self.device)  # (B, blocks)
        s_max = max(lengths)
        pos = torch.arange(s_max, device=self.device)  # (S,)
        slots = table[:, pos // bs] * bs + pos % bs  # (B, S)
        lens = torch.tensor(lengths, device=self.device)[:, None]  # (B, 1)
        return torch.where(pos[None] < lens, slots, self.storage.null_slot)

    def _decode(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        dev = self.device
        starts = [c.start for c in chunks]
        ids = torch.tensor([[c.request.all_token_ids[c.start]] for c in chunks], device=dev)  # (B, 1)
        read = self._slot_rows(chunks, [s + 1 for s in starts])  # (B, S)
        write = read[torch.arange(len(chunks), device=dev), torch.tensor(starts, device=dev)]  # (B,)
        if len(set(starts)) == 1:
            step = StepInputs(ids, None, starts[0], None)
        else:
            valid = read != self.storage.null_slot  # (B, S)
            positions = torch.tensor(starts, device=dev)[:, None]  # (B, 1)
            step = StepInputs(ids, positions, 0, valid[:, None, None, :])
        return self.model.forward(step, PagedStepCache(self.storage, write, read))  # (B, V)

    def _prefill(self, chunk: ScheduledChunk) -> torch.Tensor:
        dev = self.device
        start, n = chunk.start, chunk.num_tokens
        ids = torch.tensor([chunk.request.all_token_ids[start : start + n]], device=dev)  # (1, T)
        read = self._slot_rows([chunk], [start + n])  # (1, S)
        write = read[0, start:]  # (T,)
        step = StepInputs(ids, None, start, causal_mask(None, 1, start, n, dev))
        return self.model.forward(step, PagedStepCache(self.storage, write, read))  # (1, V)

    def execute(self, chunks: list[ScheduledChunk]) -> dict[str, int]:
        """Run every chunk; sample the next token for those that reached their sequence's end."""
        sampled: dict[str, int] = {}
        with torch.inference_mode():
            decodes = [c for c in chunks if c.num_tokens == 1]
            rows: list[tuple[ScheduledChunk, torch.Tensor]] = []
            if decodes:
                logits = self._decode(decodes)
                rows += [(c, logits[b]) for b, c in enumerate(decodes)]
            for c in chunks:
                if c.num_tokens > 1:
                    logits = self._prefill(c)
                    rows.append((c, logits[0]))
            rows = [(c, lg) for c, lg in rows if c.samples]
            greedy = [(c, lg) for c, lg in rows if c.request.params.greedy and c.request.params.repetition_penalty == 1.0]
            if greedy:
                tokens = torch.stack([lg for _, lg in greedy]).argmax(-1).tolist()
                sampled.update({c.request.request_id: t for (c, _), t in zip(greedy, tokens)})
            for c, lg in rows:
                req = c.request
                if req.request_id in sampled:
                    continue
                seen = None
                if req.params.repetition_penalty != 1.0:
                    seen = torch.tensor(req.all_token_ids, device=lg.device)
                sampled[req.request_id] = req.sampler(lg, seen)
        return sampled
