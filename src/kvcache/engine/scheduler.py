"""Continuous batching: which requests compute how many tokens this step.

Each step has a token budget. Running requests go first (a decode needs 1 token, a
partly prefilled prompt continues with a chunk); then waiting requests are admitted in
FCFS order while blocks and budget allow, starting from their prefix-cache hits. Long
prompts are prefilled in chunks so they do not stall everyone's decoding. When a running
request cannot get a block, the most recently arrived running request is preempted: its
blocks are freed and it goes back to the head of the queue, to be recomputed (prefix-cache
hits make that cheap). A request without a cache (`use_cache` off) is restarted after each
sampled token: blocks freed, computed from its first token again. Under per-request policy
caches a request starts from the cache its conversation kept (`kept_caches.py`) instead of
prefix-cache hits. The n samples of one prompt fork from its first sample once its prompt is
computed (`fork`): they join the running batch on its blocks, shared by reference. The
scheduler moves block ids through `KVCacheManager`, never tensors.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvcache.cache.manager import KVCacheManager
from kvcache.engine.request import Request, Status

if TYPE_CHECKING:
    from kvcache.engine.kept_caches import KeptCaches


@dataclass
class ScheduledChunk:
    """Compute tokens [start, start + num_tokens) of `request`; sample if that reaches its end."""

    request: Request
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)  # can never fit; finished with an error

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """FCFS continuous-batching scheduler with chunked prefill and recompute preemption."""

    def __init__(self, kv: KVCacheManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 max_live_tokens: int | None = None, split_at_prompt_end: bool = False,
                 prefix_hit_limit: Callable[[Request], int | None] | None = None, prefill_piece: int | None = None,
                 slots_for: Callable[[int], int] | None = None, kept: KeptCaches | None = None):
        """`max_live_tokens`: the most tokens one sequence holds in blocks at a time, whatever
        its length (a window or sinks policy gives blocks back), or None (all of them).
        `split_at_prompt_end`: no chunk runs past a request's prompt (an eviction policy
        compresses the prompt there). `prefix_hit_limit(request)`: the most tokens a
        prefix-cache hit may cover (None: no limit).
        `prefill_piece`: per-request policy caches, whose results depend on how a prompt is cut:
        prompt chunks end only at multiples of it (or at the prompt's end), so a prompt is always
        computed in the same pieces however the batch around it looks, and tokens after the
        prompt (recomputed outputs) go one at a time, as they were decoded.
        `slots_for(n)`: the block slots a sequence of n tokens is granted, when they are not its
        tokens (a per-request cache's byte bound at its packed rate, see `cache.row_policy`;
        non-decreasing in n); None: one slot a token.
        `kept`: per-request caches kept between the requests of a conversation; a request is
        admitted from its conversation's cache (instead of prefix-cache hits), and the oldest
        kept ones are dropped before a request waits or a running one is preempted for blocks."""
        if prefill_piece is not None and not 0 < prefill_piece <= max_num_batched_tokens:
            raise ValueError(f"prefill_piece must be in 1..{max_num_batched_tokens}, got {prefill_piece}.")
        self.kv = kv
        self.max_live_tokens = max_live_tokens
        self.split_at_prompt_end, self.prefix_hit_limit = split_at_prompt_end, prefix_hit_limit
        self.prefill_piece, self.slots_for = prefill_piece, slots_for
        self.kept = kept
        self.max_num_seqs, self.token_budget = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _can_ever_fit(self, request: Request) -> bool:
        """Whether the request's next step fits the whole (empty) pool."""
        need = request.num_tokens + 1
        if self.max_live_tokens is not None:
            need = min(need, self.max_live_tokens)
        return self.kv.can_fit(self.slots_for(need) if self.slots_for is not None else need)

    def _allocate(self, request: Request, computed: int, n: int, blocks=()) -> list[int] | None:
        """Grow the request's blocks to cover `computed + n` tokens (their slots under `slots_for`)."""
        if self.slots_for is not None:
            computed, n = self.slots_for(computed), self.slots_for(computed + n) - self.slots_for(computed)
        return self.kv.allocate_slots(request.request_id, request.all_token_ids, computed, n, blocks)

    def _chunk(self, request: Request, computed: int, budget: int) -> int:
        """Tokens of `request` to compute this step, from `computed` on."""
        n = min(request.num_tokens - computed, budget)
        prompt = len(request.prompt_token_ids)
        if (self.split_at_prompt_end or self.prefill_piece) and computed < prompt:
            n = min(n, prompt - computed)
        if self.prefill_piece:
            if computed >= prompt:
                return min(n, 1)  # as decoded: one token a step
            end = computed + n
            if end < prompt:  # whole pieces only (0: wait for a step with more budget left)
                n = end // self.prefill_piece * self.prefill_piece - computed
            n = max(n, 0)
        return n

    def preempt(self, request: Request) -> None:
        """Send a running request back to the head of the queue, its blocks freed (recomputed later)."""
        self._preempt(request, SchedulerOutput())

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.kv.free(request.request_id)
        self.running.remove(request)
        request.status, request.num_computed_tokens = Status.WAITING, 0
        request.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted.append(request)

    def fork(self, parent: Request, child: Request) -> None:
        """Start `child`, another sample of `parent`'s prompt, from the tokens `parent` has
        computed: it runs on `parent`'s blocks, each shared (copied on write by the manager).
        A `parent` that lost its blocks this step (preempted) leaves `child` at the head of
        the queue, to be computed as a preempted request is. Forks join the running batch even
        past `max_num_seqs` (it bounds admissions from the queue)."""
        child.num_cached_tokens = parent.num_cached_tokens
        if parent.status != Status.RUNNING or parent.request_id not in self.kv:
            self.waiting.appendleft(child)
            return
        self.kv.fork(parent.request_id, child.request_id)
        child.num_computed_tokens, child.status = parent.num_computed_tokens, Status.RUNNING
        self.running.append(child)

    def restart(self, request: Request) -> None:
        """A running request computes its sequence again from the first token (`use_cache`
        off): its blocks go back now, it keeps its place in the running batch."""
        self.kv.restart(request.request_id)
        request.num_computed_tokens = 0

    def _fail(self, request: Request, out: SchedulerOutput) -> None:
        """Finish a request that can never fit the pool, with an error; free what it held."""
        self.kv.free(request.request_id)
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status, request.finish_reason = Status.FINISHED, "error"
        n = request.num_tokens + 1
        need = f"{n} tokens" if self.slots_for is None else f"{self.slots_for(n)} token slots (for its {n} tokens)"
        request.error = (f"The request needs {need} of KV cache but the whole pool holds "
                         f"{self.kv.num_blocks * self.kv.block_size}.")
        out.failed.append(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.token_budget
        scheduled: set[str] = set()
        # 1) running requests, oldest first; preempt the newest when blocks run out
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._chunk(req, req.num_computed_tokens, budget)
            if n == 0:  # its next prefill piece does not fit this step's budget
                i += 1
                continue
            while self._allocate(req, req.num_computed_tokens, n) is None:
                if self.kept is not None and self.kept.drop_oldest():
                    continue  # idle memory goes first
                victim = self.running[-1]
                if victim is req and not self._can_ever_fit(req):
                    self._fail(req, out)  # it outgrew the whole pool: fail it alone, now
                    break
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                out.chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
                scheduled.add(req.request_id)
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: nothing after it is left to run
        # 2) waiting requests in FCFS order (none if this step had to preempt)
        while self.waiting and not out.preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if not self._can_ever_fit(req):
                self._fail(req, out)
                continue
            blocks, n_cached = self.kv.get_computed_blocks(req.all_token_ids) if req.use_cache else ([], 0)
            limit = self.prefix_hit_limit(req) if self.prefix_hit_limit is not None else None
            if limit is not None and n_cached > limit:
                blocks = blocks[: max(limit, 0) // self.kv.block_size]
                n_cached = len(blocks) * self.kv.block_size
            if self.kept is not None:
                n_cached = self.kept.adopt(req)
            n = self._chunk(req, n_cached, budget)
            table = self._allocate(req, n_cached, n, blocks) if n else None
            while n and table is None and self.kept is not None and self.kept.drop_oldest():
                table = self._allocate(req, n_cached, n, blocks)
            if table is None:
                if self.kept is not None:
                    self.kept.give_back(req)
                break  # head of the queue waits for blocks; FCFS keeps later ones behind it
            if self.kept is not None:
                self.kept.admitted(req)
            self.waiting.popleft()
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = n_cached
            req.num_computed_tokens = n_cached
            req.status = Status.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, n_cached, n))
            budget -= n
        return out

    def finish(self, request: Request) -> None:
        """Remove a finished (or aborted) request and free its blocks at once."""
        self.kv.free(request.request_id)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = Status.FINISHED
