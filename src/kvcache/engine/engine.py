"""`LLMEngine`: requests -> scheduler -> runner -> sampler -> outputs, one step at a time."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kvcache.cache.attention import model_attention
from kvcache.cache.manager import KVCacheManager
from kvcache.cache.paged_evict import PromptScores
from kvcache.cache.paged_quant import PagedQuantizedStorage
from kvcache.cache.policies.sinks import Sinks
from kvcache.cache.policies.window import Window
from kvcache.cache.row_policy import RowPolicyStorage, policy_footprint
from kvcache.cache.storage import PagedKVStorage
from kvcache.engine.config import EngineConfig, default_prefill_piece, windowed_live_tokens
from kvcache.engine.detokenizer import IncrementalDetokenizer
from kvcache.engine.grammar import Grammars
from kvcache.engine.kept_caches import KeptCaches, common_prefix_len
from kvcache.engine.logprobs import prompt_logprobs
from kvcache.engine.policy_runner import PolicyRowRunner
from kvcache.engine.request import Request
from kvcache.engine.runner import ModelRunner
from kvcache.engine.sampling import Sampler, SamplingParams
from kvcache.engine.scheduler import Scheduler
from kvcache.engine.tier_link import TierLink
from kvcache.errors import KVCacheError
from kvcache.models.llama import LlamaModel


@dataclass
class StepOutput:
    """What one request got from one engine step."""

    request: Request
    text: str  # new text safe to show
    finished: bool


class LLMEngine:
    """Continuous-batching engine over a paged KV cache. Not thread-safe: drive it from one thread."""

    def __init__(self, model: LlamaModel, tokenizer, eos_ids: set[int], max_model_len: int, config: EngineConfig,
                 tier=None):
        """`tier`: a `cache.tier.KVTier` shared with other engines (float paged blocks with prefix
        caching only; the caller checks), or None."""
        c = model.config
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, frozenset(eos_ids)
        self.max_model_len, self.config = max_model_len, config
        bs = config.block_size
        rows = config.row_policy
        piece = slots_for = None
        if rows is not None:
            piece = config.prefill_piece or default_prefill_piece(config.max_num_batched_tokens)
            footprint = policy_footprint(rows, c, model.dtype, piece)
            self.storage = RowPolicyStorage(config.num_blocks, bs, footprint)
            slots_for = footprint.slots
        elif config.quant_format is not None:
            self.storage = PagedQuantizedStorage(c.num_layers, config.num_blocks, bs, c.num_kv_heads, c.head_dim,
                                                 model.dtype, model.device, config.quant_format, model_attention(model))
        else:
            self.storage = PagedKVStorage(c.num_layers, config.num_blocks, bs, c.num_kv_heads,
                                          c.head_dim, model.dtype, model.device, model_attention(model))
        self.kv = KVCacheManager(config.num_blocks, bs, config.enable_prefix_caching and rows is None,
                                 block_bytes=self.storage.bytes_per_block)
        self.sinks = window = None
        if config.sliding_window and config.sink_tokens is not None:
            self.sinks = window = Sinks(config.sink_tokens, config.sliding_window)
        elif config.sliding_window:
            window = Window(config.sliding_window)
        self.window = window
        self._keep_head = self.sinks.sink_blocks(bs) if self.sinks is not None else 0
        live_bound = None
        if window is not None:
            live_bound = windowed_live_tokens(window.size, config.sink_tokens or 0, bs, config.max_num_batched_tokens)
        self.evict = config.evict
        hit_limit = None
        if self.evict is not None:
            hit_limit = lambda req: self.evict.prefix_hit_limit(len(req.prompt_token_ids))  # noqa: E731
        self.kept = None  # per-request caches kept for the next request of a conversation
        if rows is not None:
            self.runner = PolicyRowRunner(model, rows, piece)
            self.kept = KeptCaches(self.kv, self.runner)
        else:
            self.runner = ModelRunner(model, self.storage, self.kv, self.sinks, self.evict, config.mixed_steps,
                                      window=self.window if self.sinks is None else None)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, live_bound,
                                   split_at_prompt_end=self.evict is not None, prefix_hit_limit=hit_limit,
                                   prefill_piece=piece, slots_for=slots_for, kept=self.kept)
        self.tier = TierLink(tier, self.kv, self.storage) if tier is not None else None
        self.tokens_evicted = 0
        self.requests: dict[str, Request] = {}
        self.groups: dict[str, list[Request]] = {}  # id -> the samples of an n > 1 request still running
        self._ids = itertools.count()
        self.tokens_generated = 0
        self.tokens_prefilled = 0
        self.last_schedule = None
        self._grammars: Grammars | None = None
        self.started = time.perf_counter()

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    eos_ids: set[int] | None = None, use_cache: bool = True,
                    conversation: str | None = None) -> Request:
        """Queue a request (ids already validated and fitted to max_model_len). `use_cache=False`:
        every step recomputes its whole sequence (no K/V kept between steps, no prefix cache).
        `conversation`: under per-request policy caches, start from the cache the conversation's
        last request left and leave this one's for the next (paged blocks: the prefix cache
        does that for every request).

        `params.n` > 1: n samples of the prompt, requests `<id>#<i>` in the returned request's
        `group` (sample 0 is returned; `abort(<id>)` stops them all). On paged blocks the prompt
        is computed once and the samples fork from it (see `Scheduler.fork`); under per-request
        policy caches or without a cache each sample is its own request from the start."""
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        n = params.n
        ids = [rid] if n == 1 else [f"{rid}#{i}" for i in range(n)]
        if rid in self.requests or rid in self.groups or any(i in self.requests for i in ids):
            raise KVCacheError(f"Request id '{rid}' is already in use.")
        if n > 1 and conversation is not None:
            raise KVCacheError("A conversation's request takes one sample (n=1).")
        eos = frozenset(eos_ids) if eos_ids is not None else self.eos_ids
        lps = None
        if params.prompt_logprobs is not None:  # a separate full forward over the prompt, no prefix cache
            lps = prompt_logprobs(self.model, list(prompt_token_ids), params.prompt_logprobs)
        group = []
        for i, sid in enumerate(ids):
            sp = params if n == 1 else params.sample(i)
            group.append(Request(sid, list(prompt_token_ids), sp, Sampler(sp, self.model.device),
                                 IncrementalDetokenizer(self.tokenizer, sp.stop), self.max_model_len, eos,
                                 use_cache=use_cache, conversation=conversation, prompt_logprobs=lps, index=i,
                                 group_id=rid))
        for req in group:
            req.group = group
            if params.structured:  # each sample its own matcher
                req.grammar = self.grammars.state(params, req.stop_ids or self.eos_ids)
            self.requests[req.request_id] = req
        if n > 1:
            self.groups[rid] = group
        if n > 1 and use_cache and self.config.row_policy is None:  # one prompt computed, then forked
            group[0].forks = group[1:]
            self.scheduler.add(group[0])
        else:
            for req in group:
                self.scheduler.add(req)
        return group[0]

    @property
    def grammars(self) -> Grammars:
        """The compiler of requests' JSON schemas into token masks (made on first use)."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.model.config.vocab_size)
        return self._grammars

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks (every sample of an n > 1 request's id)."""
        req = self.requests.get(request_id)
        for r in self.groups.get(request_id) or ([req, *req.forks] if req is not None else []):
            if not r.finished:
                r.finish_reason = r.finish_reason or "abort"
                self.scheduler.finish(r)
                self.runner.forget(r.request_id)
            r.forks = []
            self._retire(r)

    def _retire(self, req: Request) -> None:
        """Forget a finished request (and its group once every sample finished)."""
        self.requests.pop(req.request_id, None)
        if req.group_id in self.groups and all(r.finished for r in req.group):
            del self.groups[req.group_id]

    def end_conversation(self, conversation: str) -> None:
        """Free what the engine keeps for a conversation's next request (a kept per-request cache)."""
        if self.kept is not None:
            self.kept.drop(conversation)

    def conversation_tokens(self, conversation: str | None, token_ids: list[int]) -> tuple[int, int]:
        """(tokens, bytes): how much of `token_ids` the engine holds for the conversation's next
        request, the leading full blocks in the prefix cache or its kept per-request cache."""
        if self.kept is not None:
            kept = self.kept.tokens.get(conversation)
            if kept is None:
                return 0, 0
            return common_prefix_len(kept, token_ids), self.runner.bytes_held(self.kept.seq_id(conversation))
        blocks = len(self.kv.cached_prefix_blocks(token_ids))
        return blocks * self.kv.block_size, blocks * self.kv.block_bytes

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[StepOutput]:
        """Schedule, run the model once, sample; return what each touched request got."""
        if self.tier is not None:
            self._tier_prefetch()
        sched = self.last_schedule = self.scheduler.schedule()
        outputs = []
        for r in sched.failed:
            for f in r.forks:  # samples waiting for a prompt that can never run fail with it
                self.scheduler.finish(f)
                f.finish_reason, f.error = "error", r.error
            for f in (r, *r.forks):
                outputs.append(StepOutput(f, "", True))
                self._retire(f)
            r.forks = []
        for r in sched.preempted + sched.failed:  # a recomputed prompt is scored (and compressed) afresh
            self.runner.forget(r.request_id)
            r.num_evicted_tokens = 0
            r.kv_bytes = 0  # its blocks went back
        if not sched.chunks:
            return outputs
        copies = self.kv.take_copies()
        if copies:  # blocks forked samples shared, copied before one of them writes into its copy
            self.storage.copy_blocks(copies)
        sampled = self.runner.execute(sched.chunks)
        now = time.perf_counter()
        for chunk in sched.chunks:
            req = chunk.request
            req.num_computed_tokens += chunk.num_tokens
            if req.use_cache:
                self.kv.cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)
                if self.tier is not None:
                    self.tier.write_through(req, chunk.start // self.config.block_size)
            if self.sinks is not None:  # sinks stay; window blocks no later query reads go back
                first = self.sinks.window_start(req.num_computed_tokens, self.config.block_size)
                self.kv.release_blocks_before(req.request_id, first, keep_head=self._keep_head)
            elif self.window is not None:  # the window policy picks the tokens; whole blocks go back
                first = self.window.first_kept(req.num_computed_tokens, self.config.block_size)
                self.kv.release_blocks_before(req.request_id, first)
            elif self.evict is not None and req.num_computed_tokens == len(req.prompt_token_ids):
                self._compress_prompt(req)
            if chunk.num_tokens > 1 or not req.output_token_ids:
                self.tokens_prefilled += chunk.num_tokens
            req.kv_bytes = self.request_bytes(req.request_id)  # before a finish frees its blocks
            if req.request_id not in sampled:
                continue
            forks, req.forks = req.forks, []
            for f in forks:  # its prompt is computed: the other samples start from its blocks
                self.scheduler.fork(req, f)
                f.num_evicted_tokens, f.kv_bytes = req.num_evicted_tokens, req.kv_bytes
            outputs += [self._take_token(r, sampled[r.request_id], now) for r in (req, *forks)]
        return outputs

    def _tier_prefetch(self) -> None:
        """Look the requests this step may admit up in the shared tier, once each (`TierLink`)."""
        slots = self.config.max_num_seqs - len(self.scheduler.running)
        for req in list(self.scheduler.waiting)[: max(slots, 0)]:
            if req.use_cache and not req.tier_checked and req.num_cached_tokens < 0:
                self.tier.prefetch(req)

    def _take_token(self, req: Request, token: int, now: float) -> StepOutput:
        """Append a sampled token to `req`; finish it (its blocks go back) or restart it if uncached."""
        text = req.append_token(token, now)
        self.tokens_generated += 1
        done = req.finish_reason is not None
        if done:
            text += req.detok.flush()
            if self.kept is not None and req.use_cache:
                self.kept.keep(req)  # its cache and blocks wait for the conversation's next request
            self.scheduler.finish(req)
            self._retire(req)
            self.runner.forget(req.request_id)
        elif not req.use_cache:  # no K/V kept: the next token is computed from the first one
            self.scheduler.restart(req)
            self.runner.forget(req.request_id)
            req.num_evicted_tokens = 0
        return StepOutput(req, text, done)

    def _compress_prompt(self, req: Request) -> None:
        """The eviction policy's one compression, right after the prompt's last token: per layer
        and KV head the kept tokens are copied, in order, into fresh blocks of the request."""
        rid, n = req.request_id, len(req.prompt_token_ids)
        scores = self.runner.take_prompt_scores(rid) or PromptScores(self.evict, n, self.model.config.num_layers)
        keep = self.evict.target(n)
        if keep >= n:
            return
        slot_of = torch.tensor(self.kv.slots(rid, 0, n), device=self.storage.device)  # (n,) position -> slot
        by_keys = not self.evict.needs_queries
        index = torch.stack([scores.keep(layer, self.storage.keys_at(layer, slot_of) if by_keys else None)
                             for layer in range(self.model.config.num_layers)])  # (L, Hkv, keep) positions
        k, v = self.storage.gather_tokens(slot_of[index])  # (L, Hkv, keep, ...) copies
        table = self.kv.compact(rid, keep, n - keep)
        if table is None:  # every block is shared and the pool is full: recompute it later
            self.scheduler.preempt(req)
            req.num_evicted_tokens = 0
            return
        self.storage.zero_blocks(table)
        self.storage.write_tokens(torch.tensor(self.kv.slots(rid, n - keep, n), device=self.storage.device), k, v)
        req.num_evicted_tokens = n - keep
        self.tokens_evicted += n - keep

    def stats(self) -> dict:
        """Blocks total/used/cached/free, prefix hit rate, running/waiting, preemptions, token counts."""
        u = self.kv.usage()
        return {
            **u,
            "block_size": self.config.block_size,
            "kv_bytes_total": self.storage.nbytes,
            "kv_bytes_used": u["blocks_used"] * self.storage.bytes_per_block,
            "kv_bytes_held": self.bytes_held(),
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "preemptions": self.scheduler.num_preemptions,
            "tokens_generated": self.tokens_generated,
            "tokens_prefilled": self.tokens_prefilled,
            "tokens_evicted": self.tokens_evicted,
            **(self.tier.stats() if self.tier is not None else {}),
        }

    def request_bytes(self, request_id: str) -> int:
        """Bytes a request's K/V take now: the blocks it holds in the pool (`KVCacheManager.bytes_held`:
        whole blocks, in the storage's format), or under per-request policy caches what its cache
        holds (blocks there are a grant, not memory). 0 when it holds nothing."""
        if self.config.row_policy is not None:
            return self.runner.bytes_held(request_id)
        return self.kv.bytes_held(request_id)

    def bytes_held(self) -> int:
        """Bytes all requests' K/V take now, by the rule of `request_bytes`; a block shared by
        several requests counts once here (in each one's own figure)."""
        if self.config.row_policy is not None:
            return sum(self.runner.bytes_held(rid) for rid in list(self.runner.caches))
        return self.kv.bytes_held()

    def run_to_completion(self, requests: list[Request], on_step=None) -> None:
        """Step until every given request finished (others in flight keep running too)."""
        while any(not r.finished for r in requests):
            outs = self._step_forward()
            if on_step is not None:
                on_step(outs)

    def stream(self, request: Request) -> Iterator[str]:
        """Step until `request` finished, yielding its new text as it comes (others in flight
        keep running too). A consumer that stops early aborts it: its blocks go back at once."""
        try:
            if len(request.group) > 1:
                raise KVCacheError("Streaming follows one sample; use n=1 (or generate for n > 1).")
            while not request.finished:
                for out in self._step_forward():
                    if out.request is request and out.text:
                        yield out.text
        finally:
            self.abort(request.request_id)

    def _step_forward(self) -> list[StepOutput]:
        """One step that must move some request on (run, preempt or fail one)."""
        outs = self.step()
        sched = self.last_schedule
        if not (sched.chunks or sched.preempted or sched.failed):
            raise KVCacheError("The scheduler cannot make progress: the KV pool is too small for the queue head.")
        return outs

