"""Replicas on Ray Serve and the shared KV tier, measured through `kvcache serve`.

Every server here is the real command line (`python -m kvcache.cli serve ...`) on a free
127.0.0.1 port, started and stopped by this script; `--threads` is per replica. Parts (`--parts`):

- routing: a workload of `--shared-requests` requests over `--prefixes` shared prefixes of
  `--prefix-tokens` tokens (each with its own `--suffix-tokens` suffix) plus `--unrelated-requests`
  prompts of the same total length sharing nothing, shuffled (`--seed`), sent by `--clients`
  concurrent clients to /v1/completions as token ids (`--max-tokens` greedy tokens). Run against
  `--replicas` replicas with `--routing prefix`, with `--routing round-robin`, and against one
  server without Ray. Reported: prefix hit rate (usage's cached_tokens / prompt_tokens over all
  requests), requests per replica, wall time and requests/s of each run.
- tier: a Redis tier (a `redis-server` this script starts on a free loopback port: no
  persistence, `--redis-maxmemory`, allkeys-lru) behind `--replicas` replicas. For each of
  `--tier-prompts` rounds: a `--prefix-tokens` prompt pinned to replica A (`X-Kvcache-Replica`),
  then, once A's blocks are written, the same prompt pinned to replica B (fetched from the tier),
  then a fresh prompt of the same length pinned to B (recomputed). Streamed; TTFT is the client's
  time to the first token. Reported: median TTFTs and their ratio, cached_tokens, whether B's
  tokens equal A's; and the bytes check: the Redis values' total length = keys x the tier's
  value size = keys x (pool bytes per block + the value's header).
- disk: one server with `--kv-tier disk:DIR` answers a `--prefix-tokens` prompt, stops, starts
  again: the first request on the prompt reports cached_tokens (goal >= 90% of the prompt); the
  files' bytes = files x value size = the tier's `kv_tier_stored_bytes`.
- faults (not in the default parts: two runs of `--fault-seconds` each plus three server starts):
  `--fault-clients` clients stream /v1/completions (`--fault-prompt-tokens` prompts cut from the
  corpus at random places, `--max-tokens` tokens each) for `--fault-seconds` against `--replicas`
  replicas. (1) Halfway, one replica's process is killed (SIGKILL, its pid from
  /v1/cache/replicas): requests are counted completed, failed (an HTTP error or a broken
  connection; goal 0) and cut (a stream ended by the ingress's error event); /metrics gives the
  ingress's retries; Serve's replacement replica is shown by its row. (2) With a Redis tier,
  halfway the redis-server is stopped: the same counts, tokens/s before and after the stop, and the
  tier errors in /metrics. (3) One server on a Redis tier answers a prompt, one byte of the tier
  value of its first block is flipped, a restarted server answers the prompt again: the value is
  refused (a `corrupt` tier error), and the tokens equal the first, cold, answer's.

    python benchmarks/bench_replicas.py --json                  # the measured run
    python benchmarks/bench_replicas.py --parts faults --json   # the fault runs (60 s each)
    python benchmarks/bench_replicas.py --parts disk --no-record   # a quick check

Progress goes to stderr; `--json` prints the results on stdout. Each run writes its record
(command, commit, CPU, every request's figures) to `--record-dir` (default benchmarks/results;
the single server's routing run is the baseline); `--no-record` writes none.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from kvcache.bench import record
from kvcache.bench.common import consoles, require_at_least_one, run_main
from kvcache.bench.redis_server import RedisServer, redis_server_binary
from kvcache.bench.serve import ServeProcess, free_port, run_clients
from kvcache.errors import KVCacheError
from kvcache.models.loader import DEFAULT_MODEL

PARTS = ("routing", "tier", "disk", "faults")
DEFAULT_PARTS = ("routing", "tier", "disk")
REPLICA_HEADER = "X-Kvcache-Replica"
MODEL_ID = "bench"  # the served model name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Replicas on Ray Serve: routing hit rates, the KV tier across "
                                            "replicas and restarts, the tier's bytes.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                   help=f"comma-separated parts to run, of {','.join(PARTS)} (default {','.join(DEFAULT_PARTS)})")
    p.add_argument("--replicas", type=int, default=2, help="engine replicas (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica and of the single server (default 1)")
    p.add_argument("--kv-cache-memory", default="1GiB", help="KV pool of each engine (default 1GiB)")
    p.add_argument("--prefixes", type=int, default=4, help="shared prefixes (default 4)")
    p.add_argument("--shared-requests", type=int, default=32, help="requests over the shared prefixes (default 32)")
    p.add_argument("--unrelated-requests", type=int, default=32, help="requests sharing nothing (default 32)")
    p.add_argument("--prefix-tokens", type=int, default=1024, help="tokens of a shared prefix and of a tier prompt "
                                                                   "(default 1024)")
    p.add_argument("--suffix-tokens", type=int, default=32, help="each shared request's own tokens (default 32)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients of the routing workload (default 8)")
    p.add_argument("--max-tokens", type=int, default=8, help="greedy tokens per request (default 8)")
    p.add_argument("--tier-prompts", type=int, default=3, help="rounds of the tier's A-then-B measurement (default 3)")
    p.add_argument("--redis-maxmemory", default="1gb", help="the Redis tier's maxmemory (default 1gb)")
    p.add_argument("--fault-seconds", type=float, default=60.0, help="length of each fault run (default 60)")
    p.add_argument("--fault-clients", type=int, default=16, help="streaming clients of the fault runs (default 16)")
    p.add_argument("--fault-prompt-tokens", type=int, default=256, help="prompt tokens of a fault-run request "
                                                                        "(default 256)")
    p.add_argument("--seed", type=int, default=0, help="workload order (default 0)")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds a server may take to come up "
                                                                      "(default 300)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout (the table goes to stderr)")
    record.add_arguments(p)
    args = p.parse_args(argv)
    require_at_least_one(p, args, ("replicas", "threads", "prefixes", "prefix_tokens", "suffix_tokens", "clients",
                                   "max_tokens", "tier_prompts", "fault_clients", "fault_prompt_tokens"))
    for name in ("shared_requests", "unrelated_requests"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must not be negative")
    if args.shared_requests + args.unrelated_requests < 1:
        p.error("the workload is empty: give --shared-requests or --unrelated-requests")
    if args.start_timeout <= 0:
        p.error("--start-timeout must be positive")
    if args.fault_seconds <= 0:
        p.error("--fault-seconds must be positive")
    args.part_list = [s.strip() for s in args.parts.split(",") if s.strip()]
    for part in args.part_list:
        if part not in PARTS:
            p.error(f"unknown part '{part}' in --parts (use {', '.join(PARTS)})")
    if not args.part_list:
        p.error("--parts is empty")
    for part in ("tier", "faults"):
        if part in args.part_list and args.replicas < 2:
            p.error(f"the {part} part needs --replicas 2 or more (a request goes from one replica to another)")
        if part in args.part_list and redis_server_binary() is None:
            p.error(f"the {part} part needs redis-server (Debian package redis-server; scripts/ensure_redis.sh "
                    "installs it)")
    args.record_folder = record.parse_folder(p, args)
    return args


def say(err, text: str) -> None:
    """A progress line on stderr, as written (no markup: labels are in brackets)."""
    err.print(text, markup=False, highlight=False)


# -- servers ---------------------------------------------------------------------------------

class Server(ServeProcess):
    """One `kvcache serve` process (with or without --replicas) on a free loopback port; with
    replicas it is up once every replica is listed."""

    def __init__(self, args, err, label: str, replicas: int | None = None, routing: str | None = None,
                 tier: str | None = None):
        serve_args = ["--model", args.model, "--served-model-name", MODEL_ID, "--threads", str(args.threads),
                      "--kv-cache-memory", args.kv_cache_memory, "--log-level", "warning"]
        if replicas is not None:
            serve_args += ["--replicas", str(replicas), "--routing", routing or "prefix"]
        if tier is not None:
            serve_args += ["--kv-tier", tier]
        super().__init__(serve_args, err, label, args.start_timeout)
        self.replicas = replicas

    def ready(self) -> bool:
        if not self.replicas:
            return super().ready()
        import httpx

        r = httpx.get(self.url + "/v1/cache/replicas", timeout=10)
        return r.status_code == 200 and len(r.json()["replicas"]) == self.replicas

    def replica_rows(self) -> list[dict]:
        import httpx

        return httpx.get(self.url + "/v1/cache/replicas", timeout=30).json()["replicas"]

    def metrics(self) -> dict[str, float]:
        """/metrics as name{labels} -> value."""
        import httpx

        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=30).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


# -- requests --------------------------------------------------------------------------------

def corpus_slices(args) -> "Corpus":
    from transformers import AutoTokenizer

    from kvcache.bench.common import corpus_ids, quiet_transformers
    from kvcache.models.loader import resolve_model_dir

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_dir(args.model, progress=False)))
    return Corpus(corpus_ids(tokenizer))


class Corpus:
    """Consecutive, non-overlapping slices of the corpus's token ids: prompts that share nothing."""

    def __init__(self, ids: list[int]):
        self.ids, self.at = ids, 0

    def take(self, n: int) -> list[int]:
        if self.at + n > len(self.ids):
            raise KVCacheError(f"The corpus has {len(self.ids)} tokens; the workload needs more.")
        out = self.ids[self.at:self.at + n]
        self.at += n
        return out


def workload(args, corpus: Corpus) -> list[dict]:
    """The routing workload, shuffled: {"kind": "shared" | "unrelated", "prefix": i or None, "ids": [...]}."""
    prefixes = [corpus.take(args.prefix_tokens) for _ in range(args.prefixes)]
    reqs = [{"kind": "shared", "prefix": i % args.prefixes, "ids": prefixes[i % args.prefixes] +
             corpus.take(args.suffix_tokens)} for i in range(args.shared_requests)]
    reqs += [{"kind": "unrelated", "prefix": None, "ids": corpus.take(args.prefix_tokens + args.suffix_tokens)}
             for _ in range(args.unrelated_requests)]
    random.Random(args.seed).shuffle(reqs)
    return reqs


def complete(client, url: str, ids: list[int], max_tokens: int, pin: str | None = None) -> dict:
    """One /v1/completions request: usage, text, the answering replica and the latency."""
    headers = {REPLICA_HEADER: pin} if pin else {}
    body = {"model": MODEL_ID, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    r = client.post(url + "/v1/completions", json=body, headers=headers, timeout=600)
    latency = time.perf_counter() - t0
    if r.status_code != 200:
        raise KVCacheError(f"A request failed with HTTP {r.status_code}: {r.text[:200]}")
    d = r.json()
    return {"prompt_tokens": d["usage"]["prompt_tokens"],
            "cached_tokens": (d["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0),
            "text": d["choices"][0]["text"], "replica": r.headers.get(REPLICA_HEADER), "latency_s": latency}


def stream(client, url: str, ids: list[int], max_tokens: int, pin: str | None = None) -> dict:
    """One streamed request: the client's TTFT (first text chunk), the text and usage."""
    headers = {REPLICA_HEADER: pin} if pin else {}
    body = {"model": MODEL_ID, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text, usage = None, [], {}
    with client.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=600) as r:
        if r.status_code != 200:
            raise KVCacheError(f"A streamed request failed with HTTP {r.status_code}: {r.read()[:200]!r}")
        replica = r.headers.get(REPLICA_HEADER)
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise KVCacheError(f"A stream ended with an error: {event['error']}")
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(choice["text"])
    return {"ttft_s": ttft, "text": "".join(text), "replica": replica,
            "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}


def run_workload(args, err, url: str, reqs: list[dict], label: str) -> dict:
    """The workload through `--clients` concurrent clients; per-request figures and totals."""
    def send(client, req):
        return {**complete(client, url, req["ids"], args.max_tokens), "kind": req["kind"], "prefix": req["prefix"]}

    try:
        results, wall = run_clients(reqs, args.clients, send)
    except KVCacheError as exc:
        raise KVCacheError(f"The {label} run: {exc}") from None
    prompt = sum(r["prompt_tokens"] for r in results)
    cached = sum(r["cached_tokens"] for r in results)
    per_replica: dict[str, int] = {}
    for r in results:
        per_replica[r["replica"] or "-"] = per_replica.get(r["replica"] or "-", 0) + 1
    out = {"label": label, "requests": len(results), "prompt_tokens": prompt, "cached_tokens": cached,
           "hit_rate": cached / prompt if prompt else 0.0, "wall_s": wall, "requests_per_s": len(results) / wall,
           "prompt_tokens_computed": prompt - cached, "requests_per_replica": per_replica,
           "shared_hit_rate": _rate([r for r in results if r["kind"] == "shared"]),
           "unrelated_hit_rate": _rate([r for r in results if r["kind"] == "unrelated"]),
           "per_request": [{k: v for k, v in r.items() if k != "text"} for r in results]}
    say(err, f"[{label}] {len(results)} requests in {wall:.1f} s: hit rate {out['hit_rate']:.3f}, "
              f"per replica {per_replica}")
    return out


def _rate(rs: list[dict]) -> float | None:
    prompt = sum(r["prompt_tokens"] for r in rs)
    return sum(r["cached_tokens"] for r in rs) / prompt if prompt else None


# -- parts -----------------------------------------------------------------------------------

def part_routing(args, err, corpus: Corpus) -> dict:
    reqs = workload(args, corpus)
    say(err, f"routing workload: {len(reqs)} requests, {args.clients} clients")
    runs = {}
    with Server(args, err, "single") as srv:
        runs["single"] = run_workload(args, err, srv.url, reqs, "single")
    for routing in ("prefix", "round-robin"):
        with Server(args, err, f"{args.replicas} replicas, {routing}", args.replicas, routing) as srv:
            runs[routing] = run_workload(args, err, srv.url, reqs, f"{routing} x{args.replicas}")
    single = runs["single"]["hit_rate"]
    ratio = lambda r: runs[r]["hit_rate"] / single if single else None  # noqa: E731
    return {"runs": runs, "prefix_vs_single": ratio("prefix"), "round_robin_vs_single": ratio("round-robin"),
            "throughput_replicas_vs_single": runs["prefix"]["requests_per_s"] / runs["single"]["requests_per_s"]}


def wait_written(srv: Server, replica: str, at_least: int, timeout: float = 60.0) -> int:
    """Until `replica` reports at least `at_least` blocks written to the tier (its stats are ~1 s old)."""
    end = time.monotonic() + timeout
    while True:
        row = next(r for r in srv.replica_rows() if r["replica"] == replica)
        if row.get("kv_tier_writes", 0) >= at_least or time.monotonic() > end:
            return row.get("kv_tier_writes", 0)
        time.sleep(0.25)


def block_figures(kv_bytes_total: int, blocks_total: int, block_size: int) -> dict:
    """An engine's pool bytes per block (K and V of every layer) and the header a tier value adds."""
    from kvcache.cache.tier.codec import header_bytes

    return {"block_bytes": kv_bytes_total // blocks_total, "header_bytes": header_bytes(block_size),
            "block_size": block_size}


def part_tier(args, err, corpus: Corpus) -> dict:
    import httpx

    with RedisServer(maxmemory=args.redis_maxmemory) as redis, \
            Server(args, err, f"{args.replicas} replicas, Redis tier", args.replicas, "round-robin",
                   tier=redis.url) as srv, httpx.Client() as client:
        a, b = sorted(r["replica"] for r in srv.replica_rows())[:2]
        for pin in (a, b):  # each replica's first request pays one-time costs
            complete(client, srv.url, corpus.take(64), 2, pin=pin)
        blocks = args.prefix_tokens // srv.replica_rows()[0]["block_size"]
        rounds = []
        for i in range(args.tier_prompts):
            prompt, other = corpus.take(args.prefix_tokens), corpus.take(args.prefix_tokens)
            before = next(r for r in srv.replica_rows() if r["replica"] == a).get("kv_tier_writes", 0)
            on_a = stream(client, srv.url, prompt, args.max_tokens, pin=a)
            written = wait_written(srv, a, before + blocks)
            on_b = stream(client, srv.url, prompt, args.max_tokens, pin=b)
            recompute = stream(client, srv.url, other, args.max_tokens, pin=b)
            rounds.append({"a": on_a, "b_tier": on_b, "b_recompute": recompute, "a_blocks_written": written - before})
            say(err, f"[tier] round {i + 1}: A {on_a['ttft_s'] * 1000:.0f} ms, B from the tier "
                      f"{on_b['ttft_s'] * 1000:.0f} ms (cached {on_b['cached_tokens']}/{on_b['prompt_tokens']}), "
                      f"B recomputing {recompute['ttft_s'] * 1000:.0f} ms")
        time.sleep(2.5)  # the replicas' stats reach the ingress every second
        rows = srv.replica_rows()
        keys, stored, lengths = redis.values()
    fig = block_figures(rows[0]["kv_bytes_total"], rows[0]["blocks_total"], rows[0]["block_size"])
    fig["value_bytes"] = rows[0]["kv_tier_value_bytes"]
    written = sum(r.get("kv_tier_writes", 0) for r in rows)
    bytes_written = sum(r.get("kv_tier_bytes_written", 0) for r in rows)
    tier_ttft = statistics.median(r["b_tier"]["ttft_s"] for r in rounds)
    recompute_ttft = statistics.median(r["b_recompute"]["ttft_s"] for r in rounds)
    return {
        "replicas": [a, b], "rounds": rounds,
        "ttft_tier_s": tier_ttft, "ttft_recompute_s": recompute_ttft, "ttft_a_cold_s":
            statistics.median(r["a"]["ttft_s"] for r in rounds),
        "speedup": recompute_ttft / tier_ttft,
        "cached_fraction": statistics.median(r["b_tier"]["cached_tokens"] / r["b_tier"]["prompt_tokens"]
                                             for r in rounds),
        "same_tokens": all(r["b_tier"]["text"] == r["a"]["text"] for r in rounds),
        "bytes": {**fig, "keys": keys, "stored_bytes": stored, "value_lengths": sorted(lengths),
                  "expected_bytes": keys * (fig["block_bytes"] + fig["header_bytes"]),
                  "exact": stored == keys * (fig["block_bytes"] + fig["header_bytes"]) == keys * fig["value_bytes"],
                  "blocks_written": written, "bytes_written": bytes_written,
                  "written_exact": bytes_written == written * fig["value_bytes"]},
        "replica_stats": rows,
    }


def part_disk(args, err, corpus: Corpus) -> dict:
    import httpx

    folder = tempfile.mkdtemp(prefix="bench-disk-tier-")
    prompt = corpus.take(args.prefix_tokens)
    try:
        with httpx.Client() as client:
            with Server(args, err, "disk tier, first", tier=f"disk:{folder}") as srv:
                first = complete(client, srv.url, prompt, args.max_tokens)
            with Server(args, err, "disk tier, restarted", tier=f"disk:{folder}") as srv:
                again = complete(client, srv.url, prompt, args.max_tokens)
                time.sleep(1.0)  # the blocks this request wrote reach the tier
                m = srv.metrics()
        files = list(Path(folder).glob("*.kvb"))
        sizes = [f.stat().st_size for f in files]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    fraction = again["cached_tokens"] / again["prompt_tokens"]
    say(err, f"[disk] after the restart: cached {again['cached_tokens']}/{again['prompt_tokens']} ({fraction:.1%}), "
              f"same text: {again['text'] == first['text']}")
    fig = block_figures(int(m["kvcache_kv_bytes_total"]), int(m["kvcache_kv_blocks_total"]),
                        int(m["kvcache_kv_block_size_tokens"]))
    stored = m.get("kvcache_kv_tier_stored_bytes")
    expected = len(files) * (fig["block_bytes"] + fig["header_bytes"])
    out = {"first": first, "restarted": again, "cached_fraction": fraction, "same_tokens": again["text"] == first["text"],
           "latency_cold_s": first["latency_s"], "latency_restarted_s": again["latency_s"],
           "bytes": {**fig, "files": len(files), "file_bytes": sum(sizes), "value_lengths": sorted(set(sizes)),
                     "stored_bytes_metric": stored, "expected_bytes": expected,
                     "exact": sum(sizes) == stored == expected}}
    return out


class StreamLoad:
    """`--fault-clients` clients streaming requests back to back until stopped; each request's
    outcome (completed, failed, cut) and the arrival time of every text chunk (a token)."""

    def __init__(self, args, url: str, corpus: Corpus):
        self.args, self.url = args, url
        self.ids, self.rng = corpus.ids, random.Random(args.seed)
        self.requests: list[dict] = []
        self.token_times: list[float] = []
        self.stop_at = 0.0
        self.lock = threading.Lock()

    def prompt(self) -> list[int]:
        with self.lock:
            at = self.rng.randrange(0, len(self.ids) - self.args.fault_prompt_tokens)
        return self.ids[at:at + self.args.fault_prompt_tokens]

    def one(self, client) -> dict:
        body = {"model": MODEL_ID, "prompt": self.prompt(), "max_tokens": self.args.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        out = {"start": time.perf_counter(), "outcome": "failed", "tokens": 0, "replica": None, "error": None}
        try:
            with client.stream("POST", self.url + "/v1/completions", json=body, timeout=300) as r:
                out["replica"] = r.headers.get(REPLICA_HEADER)
                if r.status_code != 200:
                    out["error"] = f"HTTP {r.status_code}: {r.read()[:200]!r}"
                    return out
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        if out["outcome"] != "cut":
                            out["outcome"] = "completed"
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        out["outcome"], out["error"] = "cut", event["error"].get("code")
                    elif any(c.get("text") for c in event.get("choices") or []):
                        out["tokens"] += 1
                        self.token_times.append(time.perf_counter())
        except Exception as exc:  # noqa: BLE001 - a failed request is what is counted
            out["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            out["end"] = time.perf_counter()
        return out

    def run(self, seconds: float, fault, at: float) -> tuple[float, float]:
        """Stream for `seconds`, call `fault()` after `at` of them; (start, fault time) as perf_counter."""
        import httpx

        t0 = time.perf_counter()
        self.stop_at = t0 + seconds

        def loop():
            with httpx.Client() as client:
                while time.perf_counter() < self.stop_at:
                    result = self.one(client)
                    with self.lock:
                        self.requests.append(result)

        threads = [threading.Thread(target=loop) for _ in range(self.args.fault_clients)]
        for t in threads:
            t.start()
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        fault_t = time.perf_counter()
        fault()
        for t in threads:
            t.join()
        return t0, fault_t

    def counts(self) -> dict:
        c = {k: sum(r["outcome"] == k for r in self.requests) for k in ("completed", "failed", "cut")}
        c["errors"] = sorted({r["error"] for r in self.requests if r["outcome"] == "failed"})[:5]
        return c

    def tokens_per_s(self, lo: float, hi: float) -> float:
        return sum(lo <= t < hi for t in self.token_times) / (hi - lo) if hi > lo else 0.0


def wait_replaced(srv: Server, lost: str, timeout: float = 180.0) -> tuple[float | None, list[dict]]:
    """Seconds until `--replicas` replicas answer again without `lost` (None past `timeout`), and their rows."""
    t0, rows = time.perf_counter(), []
    while time.perf_counter() - t0 < timeout:
        try:
            rows = srv.replica_rows()
        except Exception:  # noqa: BLE001 - the ingress is busy; ask again
            rows = []
        if len(rows) == srv.replicas and lost not in {r["replica"] for r in rows}:
            return time.perf_counter() - t0, rows
        time.sleep(0.5)
    return None, rows


def _by_kind(m: dict[str, float], name: str) -> dict[str, int]:
    """A counter family labelled by `kind` (as `/metrics` gives it): kind -> value."""
    prefix = name + '{kind="'
    return {k[len(prefix):].split('"', 1)[0]: int(v) for k, v in m.items() if k.startswith(prefix)}


def fault_kill(args, err, corpus: Corpus) -> dict:
    with Server(args, err, f"{args.replicas} replicas, a replica killed", args.replicas, "prefix") as srv:
        load, victim = StreamLoad(args, srv.url, corpus), {}

        def kill():
            victim.update(srv.replica_rows()[0])
            os.kill(victim["pid"], signal.SIGKILL)
            say(err, f"[faults] killed replica {victim['replica']} (pid {victim['pid']})")

        t0, killed = load.run(args.fault_seconds, kill, args.fault_seconds / 2)
        replaced_s, rows = wait_replaced(srv, victim["replica"])
        back_after = None if replaced_s is None else time.perf_counter() - killed
        m = srv.metrics()
    counts = load.counts()
    out = {**counts, "requests": len(load.requests), "killed": victim["replica"],
           "replaced_after_s": back_after, "replicas_after": [{k: r.get(k) for k in ("replica", "pid", "requests",
                                                                                   "tokens_generated")} for r in rows],
           "ingress_retries": m.get("kvcache_request_retries_total"), "streams_cut": m.get("kvcache_streams_cut_total"),
           "tokens_per_s_before": load.tokens_per_s(t0, killed),
           "tokens_per_s_after": load.tokens_per_s(killed, load.stop_at), "per_request": load.requests}
    say(err, f"[faults] kill: {out['requests']} requests: {counts['completed']} completed, {counts['failed']} failed, "
              f"{counts['cut']} cut; ingress retries {out['ingress_retries']:.0f}; a new replica "
              + (f"after {back_after:.0f} s: {[r['replica'] for r in rows]}" if back_after is not None else "never came"))
    return out


def fault_redis(args, err, corpus: Corpus) -> dict:
    with RedisServer(maxmemory=args.redis_maxmemory) as redis, \
            Server(args, err, f"{args.replicas} replicas, Redis stopped", args.replicas, "prefix", tier=redis.url) as srv:
        load = StreamLoad(args, srv.url, corpus)

        def stop():
            redis.stop()
            say(err, "[faults] redis-server stopped")

        t0, stopped = load.run(args.fault_seconds, stop, args.fault_seconds / 2)
        time.sleep(2.5)  # the replicas' stats reach the ingress every second
        m = srv.metrics()
    counts = load.counts()
    errors = _by_kind(m, "kvcache_cluster_kv_tier_errors_total")
    out = {**counts, "requests": len(load.requests), "tokens_per_s_before": load.tokens_per_s(t0, stopped),
           "tokens_per_s_after": load.tokens_per_s(stopped, load.stop_at), "tier_errors": errors,
           "tier_writes": m.get("kvcache_cluster_kv_tier_writes_blocks_total"), "per_request": load.requests}
    say(err, f"[faults] redis: {out['requests']} requests: {counts['completed']} completed, {counts['failed']} failed; "
              f"{out['tokens_per_s_before']:.1f} tokens/s before the stop, {out['tokens_per_s_after']:.1f} after; "
              f"tier errors {errors}")
    return out


def fault_flipped_byte(args, err, corpus: Corpus) -> dict:
    import httpx

    from kvcache.replicas.routing import prompt_block_hashes

    prompt = corpus.take(args.prefix_tokens)
    with RedisServer(maxmemory=args.redis_maxmemory) as redis, httpx.Client() as client:
        with Server(args, err, "Redis tier, cold", tier=redis.url) as srv:
            cold = complete(client, srv.url, prompt, args.max_tokens)
            block = int(srv.metrics()["kvcache_kv_block_size_tokens"])
        c = redis.client()
        end = time.monotonic() + 30
        while not c.keys("kvcache-*") and time.monotonic() < end:
            time.sleep(0.2)
        fingerprint = c.keys("kvcache-*")[0].decode().split("-")[1]
        first = f"kvcache-{fingerprint}-{prompt_block_hashes(prompt, block)[0] & 0xFFFF_FFFF_FFFF_FFFF:016x}"
        at = c.strlen(first) // 2
        c.setrange(first, at, bytes([c.getrange(first, at, at)[0] ^ 0x01]))
        with Server(args, err, "Redis tier, a flipped byte", tier=redis.url) as srv:
            again = complete(client, srv.url, prompt, args.max_tokens)
            m = srv.metrics()
    errors = _by_kind(m, "kvcache_kv_tier_errors_total")
    out = {"cold": cold, "again": again, "same_tokens": again["text"] == cold["text"], "tier_errors": errors,
           "tier_hits": m.get("kvcache_kv_tier_hits_blocks_total"), "flipped_key": first, "flipped_at": at}
    say(err, f"[faults] flipped byte: tier errors {errors}, cached {again['cached_tokens']}/{again['prompt_tokens']}, "
              f"same tokens as the cold run: {out['same_tokens']}")
    return out


def part_faults(args, err, corpus: Corpus) -> dict:
    return {"kill": fault_kill(args, err, corpus), "redis": fault_redis(args, err, corpus),
            "flipped_byte": fault_flipped_byte(args, err, corpus)}


# -- report ----------------------------------------------------------------------------------

def table(results: dict, args):
    from rich import box
    from rich.table import Table

    t = Table(title=f"Replicas on Ray Serve and the KV tier: {args.model}, {args.threads} thread(s) per engine",
              box=box.SIMPLE_HEAVY)
    t.add_column("figure", justify="left")
    t.add_column("value", justify="right")
    if "routing" in results:
        r = results["routing"]
        for name, run in r["runs"].items():
            t.add_row(f"hit rate, {name}", f"{run['hit_rate']:.3f} ({run['requests_per_s']:.2f} req/s, "
                      f"{run['wall_s']:.1f} s; {run['requests_per_replica']})")
        t.add_row("prefix / single (goal >= 0.9)", f"{r['prefix_vs_single']:.3f}")
        t.add_row("round-robin / single", f"{r['round_robin_vs_single']:.3f}")
        t.add_row(f"req/s, {args.replicas} replicas (prefix) / single", f"{r['throughput_replicas_vs_single']:.2f}")
    if "tier" in results:
        r = results["tier"]
        t.add_row("TTFT on B: tier / recompute (ms)",
                  f"{r['ttft_tier_s'] * 1000:.0f} / {r['ttft_recompute_s'] * 1000:.0f} ({r['speedup']:.1f}x)")
        t.add_row("B's cached fraction, same tokens as A", f"{r['cached_fraction']:.1%}, {r['same_tokens']}")
        b = r["bytes"]
        t.add_row("Redis bytes = keys x (block + header)",
                  f"{b['stored_bytes']} = {b['keys']} x ({b['block_bytes']} + {b['header_bytes']}): {b['exact']}")
    if "disk" in results:
        r = results["disk"]
        t.add_row("disk tier after a restart: cached",
                  f"{r['restarted']['cached_tokens']}/{r['restarted']['prompt_tokens']} ({r['cached_fraction']:.1%}), "
                  f"same tokens {r['same_tokens']}")
        b = r["bytes"]
        t.add_row("disk bytes = files x (block + header)",
                  f"{b['file_bytes']} = {b['files']} x ({b['block_bytes']} + {b['header_bytes']}): {b['exact']}")
    if "faults" in results:
        r = results["faults"]
        k, rd, fb = r["kill"], r["redis"], r["flipped_byte"]
        back = f"replaced after {k['replaced_after_s']:.0f} s" if k["replaced_after_s"] is not None else "not replaced"
        t.add_row("replica killed: completed / failed (goal 0) / cut", f"{k['completed']} / {k['failed']} / {k['cut']} "
                  f"({k['ingress_retries']:.0f} retried by the ingress; {back})")
        t.add_row("Redis stopped: completed / failed (goal 0)", f"{rd['completed']} / {rd['failed']}")
        t.add_row("Redis stopped: tokens/s before / after", f"{rd['tokens_per_s_before']:.1f} / "
                  f"{rd['tokens_per_s_after']:.1f}; tier errors {rd['tier_errors']}")
        t.add_row("flipped byte: refused, same tokens as cold", f"{fb['tier_errors']}, {fb['same_tokens']}")
    return t


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    console, err = consoles(args.json, width=140)
    corpus = corpus_slices(args)
    results: dict = {}
    if "disk" in args.part_list:
        results["disk"] = part_disk(args, err, corpus)
    if "routing" in args.part_list:
        results["routing"] = part_routing(args, err, corpus)
    if "tier" in args.part_list:
        results["tier"] = part_tier(args, err, corpus)
    if "faults" in args.part_list:
        results["faults"] = part_faults(args, err, corpus)
    console.print(table(results, args))
    if args.json:
        sys.stdout.write(json.dumps(record.json_safe(results), indent=2) + "\n")
        sys.stdout.flush()
    routing = results.get("routing", {}).get("runs", {})
    record.save("bench_replicas", "python benchmarks/bench_replicas.py", argv, args.record_folder,
                threads=args.threads, config=record.config_of(args),
                results=results, timings={k: v for k, v in routing.items() if k != "single"},
                baseline_timings={"single": routing["single"]} if "single" in routing else {})
    return results


if __name__ == "__main__":
    run_main(main)
