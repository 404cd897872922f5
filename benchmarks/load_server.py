"""Load test of `kvcache serve` on loopback: many concurrent streaming multi-turn chats.

N clients (default 64) chat for a fixed time (default 180 s); each turn resends the whole
history (so the prefix cache should serve it) and streams the reply. A fraction of the
clients (default 10%) hang up mid-stream on every turn. After a warm-up phase the server's
RSS is read from /metrics; after the run, once the server is idle, the script checks that
no request failed, that KV blocks in use are back to zero and that RSS is within 5% of the
post-warm-up figure. It prints a table and writes JSON to out/.

    python benchmarks/load_server.py                       # starts its own server (real model)
    python benchmarks/load_server.py --clients 8 --duration 20 --warmup 5
    python benchmarks/load_server.py --url http://127.0.0.1:8000   # an already running server

Loopback only: --url must point at 127.0.0.1 / localhost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
from rich.console import Console

from kvcache.bench import record
from kvcache.bench.serve import ServeProcess
from kvcache.errors import KVCacheError

SYSTEM = "You are a helpful assistant. Answer briefly."


@dataclass
class Totals:
    """What the clients saw during the measured phase."""

    ok: int = 0
    failed: int = 0
    disconnected: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    prompt_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.failed += 1
        if len(self.errors) < 10:
            self.errors.append(message[:300])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text page."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            out[name] = float(value)
    return out


async def metrics(client: httpx.AsyncClient) -> dict[str, float]:
    r = await client.get("/metrics")
    r.raise_for_status()
    return parse_metrics(r.text)


def user_messages(seed: int) -> list[str]:
    """Questions made from slices of real text, different per client."""
    from kvcache.bench.common import corpus_text

    words = corpus_text().split()
    rng = random.Random(seed)
    out = []
    for _ in range(64):
        start = rng.randrange(0, len(words) - 40)
        out.append("Explain this briefly: " + " ".join(words[start : start + rng.randint(15, 40)]))
    return out


async def one_turn(client, model: str, messages: list[dict], max_tokens: int, hang_up_after: int | None,
                   totals: Totals | None) -> str:
    """Stream one reply; returns its text. `hang_up_after`: close the stream after that many chunks."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.7, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last, text, chunks, ttft, gaps, usage = None, "", 0, None, [], None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']['message']}")
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                piece = choice["delta"].get("content")
                if piece:
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - t0
                    else:
                        gaps.append(now - last)
                    last, text = now, text + piece
                    chunks += 1
            if hang_up_after is not None and chunks >= hang_up_after:
                if totals is not None:
                    totals.disconnected += 1
                return text  # leaving the block closes the connection mid-stream
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk")
    if totals is not None:
        totals.ok += 1
        totals.completion_tokens += usage["completion_tokens"]
        totals.prompt_tokens += usage["prompt_tokens"]
        totals.cached_prompt_tokens += usage["prompt_tokens_details"]["cached_tokens"]
        if ttft is not None:
            totals.ttft_s.append(ttft)
        totals.itl_s.extend(gaps)
    return text


async def chat_client(i: int, client, args, deadline: float, totals: Totals | None) -> None:
    """Multi-turn chats until the deadline; every turn resends the history."""
    rng = random.Random(1000 + i)
    questions = user_messages(i)
    hangs_up = i < round(args.clients * args.disconnect_fraction)
    while time.perf_counter() < deadline:
        messages = [{"role": "system", "content": SYSTEM}]
        for _ in range(args.turns):
            if time.perf_counter() >= deadline:
                return
            messages.append({"role": "user", "content": rng.choice(questions)})
            try:
                reply = await one_turn(client, args.model_id, messages, args.max_tokens,
                                       rng.randint(1, 8) if hangs_up else None, totals)
            except Exception as exc:  # counted, and the client starts a new conversation
                if totals is not None:
                    totals.fail(f"client {i}: {type(exc).__name__}: {exc}")
                break
            messages.append({"role": "assistant", "content": reply})


async def wait_idle(client, timeout: float = 60.0) -> dict[str, float]:
    """Poll /metrics until nothing runs, waits or holds KV blocks (or the timeout)."""
    end = time.perf_counter() + timeout
    while True:
        m = await metrics(client)
        idle = m["kvcache_requests_running"] == 0 and m["kvcache_requests_waiting"] == 0
        if (idle and m["kvcache_kv_blocks_used"] == 0 and m["kvcache_requests_in_flight"] == 0) \
                or time.perf_counter() > end:
            return m
        await asyncio.sleep(0.25)


async def phase(args, client, seconds: float, totals: Totals | None) -> float:
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    await asyncio.gather(*[chat_client(i, client, args, deadline, totals) for i in range(args.clients)])
    return time.perf_counter() - t0


async def run(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(120.0, connect=10.0)) as client:
        models = (await client.get("/v1/models")).json()
        args.model_id = models["data"][0]["id"]
        await phase(args, client, args.warmup, None)
        start = await wait_idle(client)
        totals = Totals()
        elapsed = await phase(args, client, args.duration, totals)
        end = await wait_idle(client)
    rss0, rss1 = start["process_resident_memory_bytes"], end["process_resident_memory_bytes"]
    rss_change = (rss1 - rss0) / rss0 if rss0 else 0.0
    hits = end["kvcache_prefix_cache_hits_tokens_total"] - start["kvcache_prefix_cache_hits_tokens_total"]
    queries = end["kvcache_prefix_cache_queries_tokens_total"] - start["kvcache_prefix_cache_queries_tokens_total"]
    result = {
        "clients": args.clients, "duration_s": round(elapsed, 2), "warmup_s": args.warmup, "turns": args.turns,
        "max_tokens": args.max_tokens, "disconnect_fraction": args.disconnect_fraction,
        "requests_ok": totals.ok, "requests_failed": totals.failed, "requests_disconnected": totals.disconnected,
        "completion_tokens": totals.completion_tokens, "tokens_per_s": totals.completion_tokens / elapsed,
        "ttft_p50_ms": 1e3 * percentile(totals.ttft_s, 50), "ttft_p99_ms": 1e3 * percentile(totals.ttft_s, 99),
        "itl_p50_ms": 1e3 * percentile(totals.itl_s, 50), "itl_p99_ms": 1e3 * percentile(totals.itl_s, 99),
        "cached_prompt_fraction": totals.cached_prompt_tokens / totals.prompt_tokens if totals.prompt_tokens else 0,
        "prefix_hit_rate_run": hits / queries if queries else 0.0,
        "preemptions_run": end["kvcache_preemptions_total"] - start["kvcache_preemptions_total"],
        "blocks_used_after": end["kvcache_kv_blocks_used"], "blocks_total": end["kvcache_kv_blocks_total"],
        "rss_after_warmup_bytes": rss0, "rss_after_run_bytes": rss1, "rss_change": rss_change,
        "errors": totals.errors,
        "ttft_s": [round(t, 6) for t in totals.ttft_s],  # every completed request's, in completion order
    }
    result["checks"] = {
        "zero_failures": totals.failed == 0,
        "blocks_back_to_zero": end["kvcache_kv_blocks_used"] == 0,
        "rss_within_5_percent": abs(rss_change) <= 0.05,
    }
    return result


def report(r: dict) -> None:
    from rich.table import Table

    t = Table(title=f"kvcache serve under load: {r['clients']} streaming chat clients, {r['duration_s']:.0f} s "
                    f"({100 * r['disconnect_fraction']:.0f}% hang up mid-stream)")
    t.add_column("measure")
    t.add_column("value", justify="right")
    rows = [
        ("requests completed", f"{r['requests_ok']}"),
        ("requests failed", f"{r['requests_failed']}"),
        ("streams closed mid-way by clients", f"{r['requests_disconnected']}"),
        ("completion tokens", f"{r['completion_tokens']}"),
        ("tokens/s (all clients)", f"{r['tokens_per_s']:.1f}"),
        ("TTFT p50 / p99", f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} ms"),
        ("inter-token latency p50 / p99", f"{r['itl_p50_ms']:.0f} / {r['itl_p99_ms']:.0f} ms"),
        ("prompt tokens from the prefix cache", f"{100 * r['cached_prompt_fraction']:.1f}%"),
        ("preemptions", f"{r['preemptions_run']:.0f}"),
        ("KV blocks in use after (of total)", f"{r['blocks_used_after']:.0f} / {r['blocks_total']:.0f}"),
        ("server RSS after warm-up -> after run", f"{r['rss_after_warmup_bytes'] / 2**20:.0f} -> "
                                                  f"{r['rss_after_run_bytes'] / 2**20:.0f} MiB "
                                                  f"({100 * r['rss_change']:+.2f}%)"),
    ]
    for row in rows:
        t.add_row(*row)
    console = Console(width=110)
    console.print(t)
    for name, ok in r["checks"].items():
        console.print(f"{'PASS' if ok else 'FAIL'}  {name.replace('_', ' ')}")
    for e in r["errors"]:
        console.print(f"  error: {e}")


def server_args(args) -> list[str]:
    """`kvcache serve` options for the server this script starts."""
    out = ["--model", args.model, "--kv-cache-memory", args.kv_cache_memory, "--max-num-seqs", str(args.max_num_seqs),
           "--log-level", "warning"]
    return out + (["--threads", str(args.threads)] if args.threads else [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server on loopback (default: start one)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model for the server this script starts")
    p.add_argument("--kv-cache-memory", default="2GiB")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=180.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds of the same load before measuring")
    p.add_argument("--turns", type=int, default=4, help="turns per conversation before a new one")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--disconnect-fraction", type=float, default=0.1)
    p.add_argument("--json-out", default="out/load_server.json")
    record.add_arguments(p)
    args = p.parse_args(argv)
    folder = record.parse_folder(p, args)
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        p.error("--url must be a loopback address")
    if args.clients < 1 or args.duration <= 0 or args.turns < 1:
        p.error("--clients, --duration and --turns must be positive")
    if args.url:
        result = asyncio.run(run(args))
    else:
        with ServeProcess(server_args(args), Console(stderr=True), "server", start_timeout=180) as server:
            args.url = server.url
            result = asyncio.run(run(args))
    report(result)
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"JSON written to {out}")
    record.save("load_server", "python benchmarks/load_server.py", argv, folder, threads=args.threads,
                config=vars(args), results=result, timings={"ttft_s": result["ttft_s"]}, baseline_timings={})
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KVCacheError as exc:  # the server did not come up: its reason, in one sentence
        sys.exit(f"error: {exc}")
