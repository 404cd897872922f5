"""Server figures: request counters, a short history of engine samples, Prometheus text.

Samples are taken when someone asks (`/metrics`, the dashboard's poll), at most one per
`min_interval_s`; tokens/s is measured over the samples of the last `window_s` seconds.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass


@dataclass
class Sample:
    """The engine's state at one moment."""

    t: float  # unix time
    kv_bytes_used: int
    blocks_used: int
    blocks_cached: int
    running: int
    waiting: int
    tokens_generated: int
    prefix_hit_rate: float


def process_rss_bytes() -> int:
    """Resident memory of this process (0 where /proc is not available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class ServerMetrics:
    """Counts requests by endpoint and status and keeps a bounded history of engine samples."""

    def __init__(self, history: int = 600, min_interval_s: float = 0.5, window_s: float = 10.0):
        self.requests: Counter[tuple[str, int]] = Counter()
        self.in_flight = 0
        self.disconnects = 0
        self.history: deque[Sample] = deque(maxlen=history)
        self.min_interval_s, self.window_s = min_interval_s, window_s
        self.started = time.time()
        self._lock = threading.Lock()

    def count(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def request_counts(self) -> list[tuple[tuple[str, int], int]]:
        """((endpoint, status), requests answered) so far, sorted."""
        with self._lock:
            return sorted(self.requests.items())

    def sample(self, stats: dict) -> Sample:
        """Record the engine's `stats()` now (unless the last sample is very recent); return the latest."""
        now = time.time()
        with self._lock:
            if self.history and now - self.history[-1].t < self.min_interval_s:
                return self.history[-1]
            s = Sample(now, stats["kv_bytes_used"], stats["blocks_used"], stats["blocks_cached"], stats["running"],
                       stats["waiting"], stats["tokens_generated"], stats["prefix_hit_rate"])
            self.history.append(s)
            return s

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the recent window (0 with fewer than two samples)."""
        with self._lock:
            if len(self.history) < 2:
                return 0.0
            last = self.history[-1]
            first = next((s for s in self.history if last.t - s.t <= self.window_s), last)
            if first is last:
                first = self.history[-2]
            dt = last.t - first.t
            return (last.tokens_generated - first.tokens_generated) / dt if dt > 0 else 0.0

    def prometheus(self, stats: dict) -> str:
        """The Prometheus text exposition of the engine's `stats()` and the server's counters."""
        self.sample(stats)
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, value: float, labels: str = "") -> None:
            if not any(line.startswith(f"# HELP {name} ") for line in lines[-3:]):
                lines.append(f"# HELP {name} {help_}")
                lines.append(f"# TYPE {name} {kind}")
            lines.append(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}")

        engine_metrics(stats, metric)
        metric("kvcache_requests_in_flight", "gauge", "Generation requests the server is answering.", self.in_flight)
        metric("kvcache_generation_tokens_per_second", "gauge", f"Tokens generated per second over the last "
               f"{self.window_s:g} s.", round(self.tokens_per_second(), 3))
        metric("kvcache_client_disconnects_total", "counter", "Streams whose client went away before the end.",
               self.disconnects)
        counts = self.request_counts()
        if not counts:
            metric("kvcache_requests_total", "counter", "Requests answered, by endpoint and HTTP status.", 0)
        for (endpoint, status), n in counts:
            metric("kvcache_requests_total", "counter", "Requests answered, by endpoint and HTTP status.", n,
                   f'{{endpoint="{endpoint}",status="{status}"}}')
        metric("process_resident_memory_bytes", "gauge", "Resident memory of the server process.", process_rss_bytes())
        metric("process_uptime_seconds", "gauge", "Seconds since the server started.",
               round(time.time() - self.started, 3))
        return "\n".join(lines) + "\n"


def engine_metrics(stats: dict, metric) -> None:
    """The engine's figures (`LLM.stats()`): blocks, prefix cache, queue, tokens, weights, the tier.
    `metric(name, kind, help, value, labels="")` writes one sample."""
    metric("kvcache_kv_blocks_total", "gauge", "KV cache blocks in the pool.", stats["blocks_total"])
    metric("kvcache_kv_blocks_used", "gauge", "KV blocks held by requests.", stats["blocks_used"])
    metric("kvcache_kv_blocks_cached", "gauge", "Free KV blocks still holding a reusable prefix.",
           stats["blocks_cached"])
    metric("kvcache_kv_blocks_free", "gauge", "KV blocks not held by any request.", stats["blocks_free"])
    metric("kvcache_kv_block_size_tokens", "gauge", "Tokens per KV block.", stats["block_size"])
    metric("kvcache_kv_bytes_used", "gauge", "Bytes of KV blocks held by requests.", stats["kv_bytes_used"])
    metric("kvcache_kv_bytes_total", "gauge", "Bytes of the KV block pool.", stats["kv_bytes_total"])
    metric("kvcache_prefix_cache_hit_rate", "gauge", "Prompt tokens served from the prefix cache / prompt tokens.",
           float(stats["prefix_hit_rate"]))
    metric("kvcache_prefix_cache_queries_tokens_total", "counter", "Prompt tokens looked up in the prefix cache.",
           stats["prefix_queries"])
    metric("kvcache_prefix_cache_hits_tokens_total", "counter", "Prompt tokens found in the prefix cache.",
           stats["prefix_hits"])
    metric("kvcache_requests_running", "gauge", "Requests the engine is running.", stats["running"])
    metric("kvcache_requests_waiting", "gauge", "Requests waiting for KV blocks or a batch slot.", stats["waiting"])
    metric("kvcache_preemptions_total", "counter", "Requests preempted to free KV blocks.", stats["preemptions"])
    metric("kvcache_generation_tokens_total", "counter", "Tokens generated.", stats["tokens_generated"])
    metric("kvcache_prompt_tokens_computed_total", "counter", "Prompt tokens computed (cache hits excluded).",
           stats["tokens_prefilled"])
    if "quantization" in stats:
        metric("kvcache_weights_info", "gauge", "The weights' quantization (none, gguf, int8, int4) as a label.", 1,
               f'{{quantization="{stats["quantization"]}"}}')
        metric("kvcache_weight_bytes", "gauge", "Bytes the model weights take as held.", stats["weight_bytes"])
    if "kv_tier" in stats:
        tier_metrics(stats, metric)


def tier_metrics(stats: dict, metric) -> None:
    """The shared KV tier's counters (`cache.tier.KVTier.stats`)."""
    url = stats["kv_tier"].replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    metric("kvcache_kv_tier_info", "gauge", "The shared KV tier, by URL.", 1, f'{{url="{url}"}}')
    metric("kvcache_kv_tier_lookups_total", "counter", "Prompts looked up in the KV tier.", stats["kv_tier_lookups"])
    metric("kvcache_kv_tier_hits_blocks_total", "counter", "KV blocks fetched from the tier.", stats["kv_tier_hits"])
    metric("kvcache_kv_tier_misses_blocks_total", "counter", "KV blocks looked up in the tier and not fetched.",
           stats["kv_tier_misses"])
    metric("kvcache_kv_tier_hit_rate", "gauge", "KV tier blocks fetched / blocks looked up.",
           float(stats["kv_tier_hit_rate"]))
    metric("kvcache_kv_tier_read_bytes_total", "counter", "Bytes fetched from the KV tier.",
           stats["kv_tier_bytes_read"])
    metric("kvcache_kv_tier_writes_blocks_total", "counter", "KV blocks written to the tier.",
           stats["kv_tier_writes"])
    metric("kvcache_kv_tier_written_bytes_total", "counter", "Bytes written to the KV tier.",
           stats["kv_tier_bytes_written"])
    metric("kvcache_kv_tier_dropped_writes_total", "counter",
           "KV blocks not written: the write queue was full or the tier was resting after a failure.",
           stats["kv_tier_dropped_writes"])
    metric("kvcache_kv_tier_prompt_tokens_fetched_total", "counter", "Prompt tokens whose K/V came from the tier.",
           stats["kv_tier_tokens_fetched"])
    kinds = stats["kv_tier_errors_by_kind"]
    if not kinds:
        metric("kvcache_kv_tier_errors_total", "counter", "KV tier failures (each one a miss), by kind.", 0)
    for kind, n in sorted(kinds.items()):
        metric("kvcache_kv_tier_errors_total", "counter", "KV tier failures (each one a miss), by kind.", n,
               f'{{kind="{kind}"}}')
    if stats["kv_tier_stored_bytes"] is not None:
        metric("kvcache_kv_tier_stored_bytes", "gauge", "Bytes the disk tier holds.", stats["kv_tier_stored_bytes"])
