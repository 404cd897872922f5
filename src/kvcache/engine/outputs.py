"""What a finished request returns: one prompt's result, with its n samples."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from kvcache.engine.logprobs import TokenLogprob


@dataclass
class RequestMetrics:
    """Per-request counts and timings.

    `kv_cache_bytes` is what the request's K/V took at its last step. On the paged engine: the
    blocks it held in the pool times a block's bytes in the pool's format (float, or codes plus
    scales), each allocated block whole, the partly filled last one too, blocks shared with other
    requests through the prefix cache included; released window blocks and evicted tokens' old
    blocks are gone and not counted (`KVCacheManager.bytes_held`, the rule of the engine's
    `stats()["kv_bytes_held"]`). Under per-request policy caches: the bytes its cache held.
    """

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose K/V was reused, not computed
    generated_tokens: int = 0
    ttft_s: float = 0.0  # request start -> first token sampled
    decode_tok_s: float = 0.0  # generated tokens after the first / time spent on them
    total_s: float = 0.0
    kv_cache_bytes: int = 0  # bytes its K/V took at its last step (see above)
    history_truncated: bool = False  # a chat session dropped old turns to fit
    history_summarized: bool = False  # a chat session condensed old turns into a summary note
    preemptions: int = 0  # times the scheduler evicted this request to free blocks (recomputed after)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CompletionOutput:
    """One sample of a prompt (`SamplingParams.n`): its generated ids, text and logprobs."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    """One prompt's result: generated ids only in `token_ids`, their text in `text`.

    `completions` holds every sample (n of them, by index); the top-level `token_ids`, `text`,
    `finish_reason` and `logprobs` are sample 0's. With n > 1 the metrics count the prompt once
    and the tokens, preemptions and KV bytes of all samples (shared prompt blocks in each).
    """

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    request_id: str = ""
    error: str | None = None  # set when the request failed alone (e.g. it can never fit the KV pool)
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when SamplingParams.logprobs is set
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (the first None), when asked
    completions: list[CompletionOutput] = field(default_factory=list)  # every sample, by index

    def __post_init__(self):
        if not self.completions:
            self.completions = [CompletionOutput(0, self.token_ids, self.text, self.finish_reason, self.logprobs)]


def merge_samples(outputs: list[RequestOutput], request_id: str) -> RequestOutput:
    """One prompt's result from each of its samples' own results (sample 0 first)."""
    if len(outputs) == 1:
        return outputs[0]
    ms = [o.metrics for o in outputs]
    ttft = [m.ttft_s for m in ms if m.generated_tokens]
    metrics = replace(ms[0], generated_tokens=sum(m.generated_tokens for m in ms), ttft_s=min(ttft, default=0.0),
                      decode_tok_s=sum(m.decode_tok_s for m in ms), total_s=max(m.total_s for m in ms),
                      kv_cache_bytes=sum(m.kv_cache_bytes for m in ms), preemptions=sum(m.preemptions for m in ms))
    return replace(outputs[0], metrics=metrics, request_id=request_id,
                   error=next((o.error for o in outputs if o.error), None),
                   completions=[replace(o.completions[0], index=i) for i, o in enumerate(outputs)])
