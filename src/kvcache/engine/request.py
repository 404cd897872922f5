"""A request's state as it moves through the scheduler: waiting -> running -> finished."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from kvcache.engine.detokenizer import IncrementalDetokenizer
from kvcache.engine.grammar import GrammarState
from kvcache.engine.outputs import RequestMetrics, RequestOutput, merge_samples
from kvcache.engine.sampling import Sampler, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One generation request. Its KV lives in blocks the scheduler allocates by need.

    `num_computed_tokens` counts tokens of `all_token_ids` whose K/V are in the cache; the
    last sampled token is never computed until the next step feeds it. With `use_cache` off
    the engine gives the blocks back after every sampled token and recomputes the whole
    sequence for the next one (no prefix cache either way).

    A prompt asked for n > 1 samples is a group of n requests (`group`, sharing `group_id`,
    each with its `index`). On paged blocks only sample 0 is scheduled at first; the others
    wait in its `forks` and start from its blocks once its prompt is computed.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    detok: IncrementalDetokenizer
    max_total_tokens: int  # prompt + generated may not pass this (max_model_len)
    eos_ids: frozenset[int] = frozenset()
    use_cache: bool = True  # False: recompute the sequence from its first token at every step
    conversation: str | None = None  # requests of one chat: a per-request cache is kept for the next
    arrival: float = field(default_factory=time.perf_counter)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hits at first admission (-1 = not admitted yet)
    tier_checked: bool = False  # looked up in the shared KV tier (once, before its first admission)
    num_evicted_tokens: int = 0  # prompt tokens an eviction policy dropped (their K/V are gone)
    kv_bytes: int = 0  # bytes its K/V take, as of its last step (set by what runs it; see RequestMetrics)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: str | None = None
    preemptions: int = 0
    t_first_token: float = 0.0
    t_last_token: float = 0.0
    output_logprobs: list = field(default_factory=list)  # TokenLogprob per sampled token, when asked
    prompt_logprobs: list | None = None  # TokenLogprob | None per prompt token, when asked
    index: int = 0  # which sample of its prompt this is (n > 1)
    group_id: str = ""  # the id its caller knows; "" = request_id (n = 1)
    group: list[Request] = field(default_factory=list, repr=False, compare=False)  # all samples, self included
    forks: list[Request] = field(default_factory=list, repr=False, compare=False)  # samples waiting for its prompt
    grammar: GrammarState | None = None  # what its output must follow (json_schema / json_object), if anything

    def __post_init__(self):
        # ids that end the request, fixed for its lifetime (checked on every token)
        self.stop_ids = frozenset(self.params.stop_token_ids) | (frozenset() if self.params.ignore_eos else self.eos_ids)
        self.group_id = self.group_id or self.request_id
        self.group = self.group or [self]

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    def append_token(self, token: int, now: float) -> str:
        """Record a sampled token; decide whether the request is done. Returns new text."""
        if not self.output_token_ids:
            self.t_first_token = now
        self.t_last_token = now
        self.output_token_ids.append(token)
        if self.grammar is not None:
            self.grammar.accept(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return ""
        delta = self.detok.add(token)
        if self.detok.stopped or (self.grammar is not None and self.grammar.finished):
            self.finish_reason = "stop"
        elif len(self.output_token_ids) >= self.params.max_tokens or self.num_tokens >= self.max_total_tokens:
            self.finish_reason = "length"
        return delta

    def to_output(self) -> RequestOutput:
        """The request's result so far (final once finished)."""
        n = len(self.output_token_ids)
        decode_s = self.t_last_token - self.t_first_token
        end = self.t_last_token or time.perf_counter()
        metrics = RequestMetrics(
            prompt_tokens=len(self.prompt_token_ids),
            cached_prompt_tokens=max(0, self.num_cached_tokens),
            generated_tokens=n,
            ttft_s=(self.t_first_token - self.arrival) if n else 0.0,
            decode_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            total_s=end - self.arrival,
            kv_cache_bytes=self.kv_bytes,
            preemptions=self.preemptions,
        )
        text = self.detok.text if self.finished else self.detok.text[: self.detok.emitted]
        logprobs = list(self.output_logprobs) if self.params.logprobs is not None else None
        return RequestOutput(self.prompt_token_ids, list(self.output_token_ids), text,
                             self.finish_reason or "length", metrics, self.request_id, self.error,
                             logprobs, self.prompt_logprobs)

    def group_output(self) -> RequestOutput:
        """The result of the prompt this request samples: its group's n samples (see `merge_samples`)."""
        return merge_samples([r.to_output() for r in self.group], self.group_id)
