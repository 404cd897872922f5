"""`kvcache bench cache`: what the KV cache buys, per decode step and end to end.

At each position p: the time of one cached decode step (attend to p cached tokens, compute
one new one) against one uncached step (recompute all p+1 tokens), medians over repeats.
Then end-to-end tok/s of the same generation with and without the cache.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import torch

from kvcache.bench.common import corpus_ids
from kvcache.bench.timing import sample_times
from kvcache.cache.dense import KVCache
from kvcache.engine.sampling import SamplingParams
from kvcache.models.step import StepInputs, causal_mask


@dataclass
class CachePoint:
    position: int
    cached_ms: float
    uncached_ms: float
    speedup: float
    cached_ms_runs: list[float] = field(default_factory=list)  # every timed repeat
    uncached_ms_runs: list[float] = field(default_factory=list)


@dataclass
class EndToEnd:
    prompt_tokens: int
    new_tokens: int
    cached_tok_s: float
    uncached_tok_s: float
    speedup: float


def measure_position(llm, position: int, repeats: int) -> CachePoint:
    """Median ms of one cached and one uncached decode step at `position`."""
    model, dev = llm.model, llm.device
    ids = torch.tensor([corpus_ids(llm.tokenizer, position + 1)], device=dev)  # (1, p+1)
    with torch.inference_mode():
        cache = KVCache.for_model(model, 1, position + 1)
        model.forward(StepInputs(ids[:, :position], None, 0, causal_mask(None, 1, 0, position, dev)), cache)
        last = ids[:, position:]  # (1, 1)

        def cached_step():
            cache.truncate(position)
            model.forward(StepInputs(last, None, position, None), cache).argmax(-1).tolist()

        def uncached_step():
            mask = causal_mask(None, 1, 0, position + 1, dev)
            model.forward(StepInputs(ids, None, 0, mask), None).argmax(-1).tolist()

        cached = [t * 1e3 for t in sample_times(cached_step, repeats)]
        uncached = [t * 1e3 for t in sample_times(uncached_step, max(3, repeats // 4))]
    c, u = statistics.median(cached), statistics.median(uncached)
    return CachePoint(position, c, u, u / c, cached, uncached)


def measure_end_to_end(llm, prompt_tokens: int, new_tokens: int) -> EndToEnd:
    """tok/s of one greedy generation with the cache and the same one recomputing every step."""
    ids = corpus_ids(llm.tokenizer, prompt_tokens)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    rates = {}
    for use_cache in (True, False):
        out = llm.generate([ids], params, use_cache=use_cache)[0]
        rates[use_cache] = out.metrics.generated_tokens / out.metrics.total_s
    return EndToEnd(prompt_tokens, new_tokens, rates[True], rates[False], rates[True] / rates[False])


def run(llm, positions: list[int], repeats: int = 20, prompt_tokens: int = 128, new_tokens: int = 64,
        progress: bool = True) -> tuple[list[CachePoint], EndToEnd]:
    """All positions, then the end-to-end comparison."""
    from rich.progress import Progress

    points = []
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("cached vs uncached step", total=len(positions) + 1)
        for p in positions:
            points.append(measure_position(llm, p, repeats))
            bar.advance(task)
        e2e = measure_end_to_end(llm, prompt_tokens, new_tokens)
        bar.advance(task)
    return points, e2e


def to_json(points: list[CachePoint]) -> list[dict]:
    """The points without their raw repeats (the record keeps those)."""
    return [{k: v for k, v in asdict(p).items() if not k.endswith("_runs")} for p in points]


def record_fields(points: list[CachePoint], e2e: EndToEnd) -> dict:
    """The benchmark record's parts: ours is the cached step, the baseline recomputes every token."""
    return {"timings": {"cached_step_ms": {str(p.position): p.cached_ms_runs for p in points},
                        "end_to_end_cached_tok_s": [e2e.cached_tok_s]},
            "baseline_timings": {"uncached_step_ms": {str(p.position): p.uncached_ms_runs for p in points},
                                 "end_to_end_uncached_tok_s": [e2e.uncached_tok_s]},
            "results": {"points": to_json(points), "end_to_end": asdict(e2e)}}


def plot(points: list[CachePoint], path: str, title: str) -> None:
    """Per-step latency against position (left) and the cumulative cost of reaching it (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = [p.position for p in points]
    cached = [p.cached_ms for p in points]
    uncached = [p.uncached_ms for p in points]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(pos, uncached, "o-", label="no cache (recompute all)")
    ax1.plot(pos, cached, "o-", label="KV cache")
    ax1.set_xlabel("position (tokens already generated)")
    ax1.set_ylabel("ms per new token")
    ax1.set_yscale("log")
    ax1.set_title("cost of one token")
    ax1.legend()
    # cumulative: integrate the per-token cost from 0 to each position (trapezoid over the points)
    def cumulative(ys):
        out, total, prev = [], 0.0, (0, ys[0])
        for x, y in zip(pos, ys):
            total += (x - prev[0]) * (y + prev[1]) / 2 / 1e3
            out.append(total)
            prev = (x, y)
        return out
    ax2.plot(pos, cumulative(uncached), "o-", label="no cache: ~quadratic")
    ax2.plot(pos, cumulative(cached), "o-", label="KV cache: ~linear")
    ax2.set_xlabel("sequence length")
    ax2.set_ylabel("seconds to generate that far")
    ax2.set_title("total cost")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
