"""/metrics of a replicated server: each replica's engine figures with a `replica` label, cluster
totals (`kvcache_cluster_*`), requests routed per replica, and the ingress's own counters."""

from __future__ import annotations

import time
from collections.abc import Mapping

from kvcache.server.metrics import ServerMetrics, engine_metrics, process_rss_bytes

_NOT_SUMMED = ("_hit_rate", "_info", "_block_size_tokens")  # rates are recomputed, labels-only figures skipped


class _Families:
    """Samples grouped by metric name (one HELP/TYPE each), in first-seen order."""

    def __init__(self):
        self.meta: dict[str, tuple[str, str]] = {}
        self.samples: dict[str, list[tuple[str, float]]] = {}

    def add(self, name: str, kind: str, help_: str, value: float, labels: str = "") -> None:
        self.meta.setdefault(name, (kind, help_))
        self.samples.setdefault(name, []).append((labels, value))

    def text(self) -> str:
        lines = []
        for name, (kind, help_) in self.meta.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
            for labels, v in self.samples[name]:
                lines.append(f"{name}{labels} {v:g}" if isinstance(v, float) else f"{name}{labels} {v}")
        return "\n".join(lines) + "\n"


def _with_replica(labels: str, replica: str) -> str:
    return f'{{replica="{replica}",{labels[1:]}' if labels else f'{{replica="{replica}"}}'


def cluster_stats(per_replica: Mapping[str, dict]) -> dict:
    """Cluster totals of the figures a dashboard shows (hit rates from summed tokens)."""
    total = lambda key: sum(s.get(key) or 0 for s in per_replica.values())  # noqa: E731
    queries, hits = total("prefix_queries"), total("prefix_hits")
    out = {key: total(key) for key in ("blocks_total", "blocks_used", "blocks_cached", "blocks_free", "running",
                                       "waiting", "kv_bytes_used", "kv_bytes_total", "tokens_generated")}
    out.update(prefix_queries=queries, prefix_hits=hits, prefix_hit_rate=hits / queries if queries else 0.0)
    if any("kv_tier" in s for s in per_replica.values()):
        fetched, looked = total("kv_tier_hits"), total("kv_tier_hits") + total("kv_tier_misses")
        out.update(kv_tier_hits=fetched, kv_tier_hit_rate=fetched / looked if looked else 0.0,
                   kv_tier_errors=sum(sum((s.get("kv_tier_errors_by_kind") or {}).values())
                                      for s in per_replica.values()))
    return out


def prometheus(per_replica: Mapping[str, dict], routed: Mapping[str, int], ingress: ServerMetrics,
               extra: Mapping[str, tuple[str, str, int]]) -> str:
    """The text exposition: `per_replica` maps replica id -> its `stats()`, `routed` replica id -> requests
    sent to it, `extra` name -> (kind, help, value) of the ingress's own counters."""
    fam = _Families()
    for replica, stats in sorted(per_replica.items()):
        engine_metrics(stats, lambda n, k, h, v, labels="", r=replica: fam.add(n, k, h, v, _with_replica(labels, r)))
    sums: dict[tuple[str, str], float] = {}
    for name, samples in list(fam.samples.items()):
        if name.endswith(_NOT_SUMMED):
            continue
        for labels, v in samples:
            rest = labels.split(",", 1)[1] if "," in labels else ""
            key = (name, "{" + rest if rest else "")
            sums[key] = sums.get(key, 0) + v
    for (name, labels), v in sums.items():
        kind, help_ = fam.meta[name]
        fam.add(name.replace("kvcache_", "kvcache_cluster_", 1), kind, f"{help_} (all replicas)", v, labels)
    c = cluster_stats(per_replica)
    fam.add("kvcache_cluster_prefix_cache_hit_rate", "gauge", "Prompt tokens served from the replicas' prefix "
            "caches / prompt tokens (all replicas).", float(c["prefix_hit_rate"]))
    if "kv_tier_hit_rate" in c:
        fam.add("kvcache_cluster_kv_tier_hit_rate", "gauge", "KV tier blocks fetched / blocks looked up "
                "(all replicas).", float(c["kv_tier_hit_rate"]))
    fam.add("kvcache_replicas", "gauge", "Engine replicas answering /metrics.", len(per_replica))
    for replica, n in sorted(routed.items()):
        fam.add("kvcache_routed_requests_total", "counter", "Requests the ingress sent to each replica.", n,
                f'{{replica="{replica}"}}')
    for name, (kind, help_, value) in extra.items():
        fam.add(name, kind, help_, value)
    for (endpoint, status), n in ingress.request_counts():
        fam.add("kvcache_requests_total", "counter", "Requests answered by the ingress, by endpoint and HTTP status.",
                n, f'{{endpoint="{endpoint}",status="{status}"}}')
    fam.add("process_resident_memory_bytes", "gauge", "Resident memory of the ingress process.", process_rss_bytes())
    fam.add("process_uptime_seconds", "gauge", "Seconds since the ingress started.",
            round(time.time() - ingress.started, 3))
    return fam.text()
