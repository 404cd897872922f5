"""Turns scheduled chunks into forward passes over paged KV storage, and samples.

A step's decode rows (one new token each) and prompt chunks run as one forward pass
(`MixedStepView`): all their tokens laid out as one row, so the weights are streamed once a
step and the decode rows ride in the chunks' large matmuls; attention stays per sequence.
Steps that cannot be laid out that way (attention sinks, a chunk an eviction scorer watches,
or `mixed_steps=False`) run the decode rows as one batch (each row over its own blocks,
read in place by the storage's attention backend or gathered and masked) and each prefill chunk as its own
pass, causal from its start position. Per-step inputs travel as `StepInputs` + a `PagedStepView`. Under attention sinks every
step (decode rows and prefill chunks alike) goes through a `PagedSinksStepView` instead:
each row gathers its sink blocks and its live window blocks, and each query sees what its
own position allows.
"""

from __future__ import annotations

import torch

from kvcache.native import ops as native
from kvcache.cache.attention import windowed_causal_mask
from kvcache.cache.manager import KVCacheManager
from kvcache.cache.mixed_step import ChunkSegment, DecodeSegment, MixedStepView
from kvcache.cache.paged_evict import PagedEvict, PromptScores
from kvcache.cache.paged_sinks import FAR, PagedSinksStepView
from kvcache.cache.policies.sinks import Sinks
from kvcache.cache.policies.window import Window
from kvcache.cache.storage import PagedKVStorage, PagedStepView, slot_mask
from kvcache.engine.grammar import mask_rows
from kvcache.engine.logprobs import token_logprob
from kvcache.engine.scheduler import ScheduledChunk
from kvcache.models.llama import LlamaModel
from kvcache.models.step import StepInputs


class ModelRunner:
    """Executes one scheduler step on the model; returns sampled tokens by request id."""

    def __init__(self, model: LlamaModel, storage: PagedKVStorage, kv: KVCacheManager, sinks: Sinks | None = None,
                 evict: PagedEvict | None = None, mixed_steps: bool = True, window: Window | None = None):
        """`window`: a `window` policy, whose prompt chunks mask each query to its own window (as
        decode rows see it through the blocks released behind it)."""
        self.model, self.storage, self.kv, self.sinks, self.evict = model, storage, kv, sinks, evict
        self.window = window
        self.mixed_steps = mixed_steps
        self.device = model.device
        self.prompt_scores: dict[str, PromptScores] = {}  # request id -> what its prompt's queries attended

    def _block_rows(self, chunks: list[ScheduledChunk], lengths: list[int]) -> tuple[torch.Tensor, int | None, list[int]]:
        """(B, NB) tables of each row's live blocks covering positions [0, length_b) (blocks a
        sliding window released are skipped), padded with the null block; the first block id
        when there is one row whose blocks are consecutive (read as a view); and per row the
        number of slots attention sees (its length minus the released tokens)."""
        bs = self.kv.block_size
        tables, live = [], []
        for c, n in zip(chunks, lengths):
            rid = c.request.request_id
            n = self.kv.num_slots(rid, n)  # positions an eviction policy dropped take no slots
            lo = self.kv.first_live_block(rid)
            tables.append(self.kv.block_table(rid)[lo : -(-n // bs)])
            live.append(n - lo * bs)
        width = max(len(t) for t in tables)
        for t in tables:
            self.storage.zero_blocks(t)
        first = None
        if len(tables) == 1 and tables[0] == list(range(tables[0][0], tables[0][0] + len(tables[0]))):
            first = tables[0][0]
        null = self.storage.null_block
        rows = torch.tensor([t + [null] * (width - len(t)) for t in tables], device=self.device)  # (B, NB)
        return rows, first, live

    def _window_floor(self, chunk: ScheduledChunk) -> torch.Tensor | None:
        """(T,) the oldest slot of the chunk's live blocks each of its queries may see under a
        `window` policy: position p sees from `Window.first_kept(p)` on, as a query decoded
        alone would, so results do not depend on how prompts are chunked. None when no query
        of the chunk is limited (no window, or it starts at the live blocks)."""
        if self.window is None:
            return None
        bs = self.kv.block_size
        base = self.kv.first_live_block(chunk.request.request_id) * bs  # position of slot 0
        pos = torch.arange(chunk.start, chunk.start + chunk.num_tokens)  # (T,)
        floor = ((pos - self.window.size).clamp(min=0) // bs * bs - base).clamp(min=0)  # (T,)
        return floor if bool(floor.any()) else None

    def _write_slots(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """(N,) slots of every chunk's new tokens, in chunk order."""
        slots = []
        for c in chunks:
            slots += self.kv.slots(c.request.request_id, c.start, c.start + c.num_tokens)
        return torch.tensor(slots, device=self.device)

    def _sinks_step(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Decode rows (one token each) or one prefill chunk under attention sinks: each row
        reads its sink blocks and its live window blocks; every query is masked by its own
        position (see `cache.paged_sinks`)."""
        dev, bs = self.device, self.kv.block_size
        head = self.sinks.sink_blocks(bs)
        null = self.storage.null_block
        tables, first_window = [], []
        for c in chunks:
            rid = c.request.request_id
            table, n_blocks = self.kv.block_table(rid), -(-(c.start + c.num_tokens) // bs)
            lo = max(self.kv.first_live_block(rid), head)
            sink_blocks = table[: min(head, n_blocks)]
            tables.append(sink_blocks + [null] * (head - len(sink_blocks)) + table[lo:n_blocks])
            first_window.append(lo)
            self.storage.zero_blocks(sink_blocks + table[lo:n_blocks])
        width = max(len(t) for t in tables)
        rows = torch.tensor([t + [null] * (width - len(t)) for t in tables], device=dev)  # (B, NB)
        # entry j holds positions j*bs.. in the sink blocks, (lo + j - head)*bs.. after them; FAR past the row
        j = torch.arange(width, device=dev)  # (NB,)
        lo = torch.tensor(first_window, device=dev)[:, None]  # (B, 1)
        block_pos = torch.where(j < head, j, lo + j - head) * bs  # (B, NB)
        block_pos = block_pos.masked_fill(j >= torch.tensor([len(t) for t in tables], device=dev)[:, None], FAR)
        slot_pos = (block_pos[..., None] + torch.arange(bs, device=dev)).reshape(len(chunks), -1)  # (B, S)
        t = chunks[0].num_tokens
        assert all(c.num_tokens == t for c in chunks), "decode rows, or one prefill chunk"
        ids = torch.tensor([c.request.all_token_ids[c.start : c.start + t] for c in chunks], device=dev)  # (B, T)
        query_pos = torch.tensor([list(range(c.start, c.start + t)) for c in chunks], device=dev)  # (B, T)
        cache = PagedSinksStepView(self.storage, self._write_slots(chunks), rows, slot_pos, query_pos, self.sinks,
                                    self.model.rope)
        return self.model.forward(StepInputs(ids, query_pos, 0, None), cache)  # (B, V)

    def _decode(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        if self.sinks is not None:
            return self._sinks_step(chunks)
        dev = self.device
        starts = [c.start for c in chunks]
        ids = torch.tensor([[c.request.all_token_ids[c.start]] for c in chunks], device=dev)  # (B, 1)
        blocks, first, live = self._block_rows(chunks, [s + 1 for s in starts])  # (B, NB)
        write = self._write_slots(chunks)
        if len(set(starts)) == 1 and len(set(live)) == 1:  # equal lengths: cut K/V to them, no mask needed
            step = StepInputs(ids, None, starts[0], None)
            cache = PagedStepView(self.storage, write, blocks, kv_len=live[0], first_block=first, kv_lens=live)
            return self.model.forward(step, cache)
        positions = torch.tensor(starts, device=dev)[:, None]  # (B, 1)
        cache = PagedStepView(self.storage, write, blocks, kv_lens=live)
        if cache.in_place:  # the backend reads each row's own length: no mask
            step = StepInputs(ids, positions, 0, None)
        else:
            step = StepInputs(ids, positions, 0, slot_mask(blocks, live, self.kv.block_size))  # (B, 1, 1, S)
        return self.model.forward(step, cache)  # (B, V)

    def _observer(self, chunk: ScheduledChunk):
        """What sees a prompt chunk's queries when an eviction scorer needs them, else None."""
        req = chunk.request
        prompt = len(req.prompt_token_ids)
        if self.evict is None or not self.evict.needs_queries or chunk.start >= prompt:
            return None
        scores = self.prompt_scores.get(req.request_id)
        if scores is None:
            scores = self.prompt_scores[req.request_id] = PromptScores(self.evict, prompt, len(self.model.layers))
        return lambda layer, q, k: scores.observe(layer, q, k, chunk.start)

    def _prefill(self, chunk: ScheduledChunk) -> torch.Tensor:
        if self.sinks is not None:
            return self._sinks_step([chunk])
        dev = self.device
        start, n = chunk.start, chunk.num_tokens
        ids = torch.tensor([chunk.request.all_token_ids[start : start + n]], device=dev)  # (1, T)
        blocks, first, live = self._block_rows([chunk], [start + n])  # (1, NB)
        mask = windowed_causal_mask(live[0], n, self._window_floor(chunk), dev)  # (1, 1, T, live)
        step = StepInputs(ids, None, start, mask)
        cache = PagedStepView(self.storage, self._write_slots([chunk]), blocks, kv_len=live[0],
                               first_block=first, observer=self._observer(chunk))
        return self.model.forward(step, cache)  # (1, V)

    def _mixed(self, decodes: list[ScheduledChunk], prompts: list[ScheduledChunk]) -> torch.Tensor:
        """Decode rows and prompt chunks in one forward pass; logits (R, V) of each one's last
        token, in the order decodes + prompts."""
        dev = self.device
        ids: list[int] = []
        positions: list[int] = []
        ends: list[int] = []
        for c in decodes + prompts:
            ids += c.request.all_token_ids[c.start : c.start + c.num_tokens]
            positions += range(c.start, c.start + c.num_tokens)
            ends.append(len(ids) - 1)
        decode = None
        if decodes:
            blocks, _, live = self._block_rows(decodes, [c.start + 1 for c in decodes])  # (B, NB)
            decode = DecodeSegment(len(decodes), blocks, live)
        segments, offset = [], len(decodes)
        for c in prompts:
            blocks, first, live = self._block_rows([c], [c.start + c.num_tokens])  # (1, NB)
            segments.append(ChunkSegment(offset, c.num_tokens, blocks, live[0], first, self._window_floor(c)))
            offset += c.num_tokens
        cache = MixedStepView(self.storage, self._write_slots(decodes + prompts), decode, segments)
        step = StepInputs(torch.tensor([ids], device=dev), torch.tensor([positions], device=dev), 0, None,
                          logits_at=torch.tensor(ends, device=dev))  # (1, N) tokens and positions
        return self.model.forward(step, cache)  # (R, V)

    def execute(self, chunks: list[ScheduledChunk]) -> dict[str, int]:
        """Run every chunk; sample the next token for those that reached their sequence's end."""
        with torch.inference_mode():
            decodes = [c for c in chunks if c.num_tokens == 1 and self._observer(c) is None]
            decoded = {id(c) for c in decodes}
            prompts = [c for c in chunks if id(c) not in decoded]
            if self.mixed_steps and self.sinks is None and prompts and all(self._observer(c) is None for c in prompts):
                logits = self._mixed(decodes, prompts)  # (R, V)
                return sample_rows([(c, logits[r]) for r, c in enumerate(decodes + prompts)])
            rows: list[tuple[ScheduledChunk, torch.Tensor]] = []
            if decodes:
                logits = self._decode(decodes)
                rows += [(c, logits[b]) for b, c in enumerate(decodes)]
            for c in prompts:
                logits = self._prefill(c)
                rows.append((c, logits[0]))
            return sample_rows(rows)

    def take_prompt_scores(self, request_id: str) -> PromptScores | None:
        """What the request's prompt queries attended (an eviction scorer's input), handed over
        once the prompt is computed; None when no query was observed."""
        return self.prompt_scores.pop(request_id, None)

    def forget(self, request_id: str) -> None:
        """Drop what the runner keeps for a request that finished, failed or was preempted."""
        self.prompt_scores.pop(request_id, None)


def sample_rows(rows: list[tuple[ScheduledChunk, torch.Tensor]]) -> dict[str, int]:
    """The next token of each chunk that reached its sequence's end, from its logits (V,):
    greedy rows in one argmax, the rest through their request's sampler. A request's `forks`
    (the other samples of its prompt, whose prompt this step finished) draw their first token
    from the same logits, each with its own sampler. A request with a grammar (json_schema)
    samples from its logits with the tokens its grammar forbids masked. A request with
    `params.logprobs` set gets the token's entry (of the unmasked logits) appended to its
    `output_logprobs`."""
    sampled: dict[str, int] = {}
    rows = [(r, lg) for c, lg in rows if c.samples for r in (c.request, *c.request.forks)]
    raw = rows  # logprobs are of the model's own distribution
    ruled = [i for i, (r, _) in enumerate(rows) if r.grammar is not None]
    if ruled:  # a grammar's forbidden tokens at -inf, for those rows only
        masked = mask_rows([rows[i][0].grammar for i in ruled], [rows[i][1] for i in ruled])
        rows = list(rows)
        for i, lg in zip(ruled, masked):
            rows[i] = (rows[i][0], lg)
    greedy = [(r, lg) for r, lg in rows if r.params.greedy and r.params.repetition_penalty == 1.0]
    if greedy:
        logits = torch.stack([lg for _, lg in greedy])  # (B, V)
        fast = native.supports(logits.dtype, logits.device)  # torch's argmax takes ~2 ms at (22, V) in bf16
        tokens = (native.argmax_rows(logits) if fast else logits.argmax(-1)).tolist()
        sampled.update({r.request_id: t for (r, _), t in zip(greedy, tokens)})
    for req, lg in rows:
        if req.request_id in sampled:
            continue
        seen = None
        if req.params.repetition_penalty != 1.0:
            seen = torch.tensor(req.all_token_ids, device=lg.device)
        sampled[req.request_id] = req.sampler(lg, seen)
    for req, lg in raw:  # logprobs of the raw logits, only for requests that asked
        if req.params.logprobs is not None:
            req.output_logprobs.append(token_logprob(lg, sampled[req.request_id], req.params.logprobs))
    return sampled
