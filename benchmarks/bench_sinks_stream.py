"""One long generation through the paged engine: attention sinks against the full cache.

Each policy (`--policies`, the first is the baseline) generates `--tokens` tokens (greedy, EOS
ignored) after a short real-text prompt, as one request on the continuous-batching engine with
`max_model_len` = prompt + tokens. Every `--segment` tokens it records the decode tok/s of that
segment and the KV blocks the request holds (bytes = blocks x block bytes, what the pool really
commits to it). The full cache stops where the model's `max_position_embeddings` (or the pool)
ends it; sinks run on with flat memory. Prints a table, writes a PNG with `--plot`.

    python benchmarks/bench_sinks_stream.py --threads 2 --tokens 12000 --plot out/sinks_stream.png
    python benchmarks/bench_sinks_stream.py --tokens 600 --segment 200   # a quick check
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.progress import Progress
from rich.table import Table

from kvcache.api.llm import LLM
from kvcache.bench import record
from kvcache.bench.common import consoles, corpus_ids, print_json, save_figure
from kvcache.engine.sampling import SamplingParams
from kvcache.models.loader import DEFAULT_MODEL

DEFAULT_POLICIES = "full;sinks:n_sink=4,window=1020"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="';'-separated KV policies; the first is the baseline")
    p.add_argument("--tokens", type=int, default=12000, help="tokens to generate per policy (default 12000)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--segment", type=int, default=1000, help="tokens per measured segment (default 1000)")
    p.add_argument("--kv-cache-memory", default="1GiB")
    p.add_argument("--plot", default=None, metavar="PNG")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    record.add_arguments(p)
    a = p.parse_args(argv)
    a.policy_list = [x.strip() for x in a.policies.split(";") if x.strip()]
    if a.tokens < 2 or a.segment < 1 or a.prompt_tokens < 1:
        p.error("--tokens, --segment and --prompt-tokens must be positive")
    a.record_folder = record.parse_folder(p, a)
    return a


def stream(llm: LLM, prompt: list[int], tokens: int, segment: int, progress, task) -> list[dict]:
    """Generate up to `tokens` tokens; one row per segment: position, tok/s, blocks and bytes held."""
    engine = llm.engine
    req = engine.add_request(prompt, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True), eos_ids=set())
    block_bytes = engine.config.block_size * engine.storage.bytes_per_token
    rows, t0, n0, most = [], time.perf_counter(), 0, 0
    while not req.finished:
        engine.step()
        if req.request_id in engine.kv:
            most = max(most, sum(b >= 0 for b in engine.kv.block_table(req.request_id)))
        n = len(req.output_token_ids)
        if n - n0 >= segment or (req.finished and n > n0):
            now = time.perf_counter()
            rows.append({"position": len(prompt) + n, "tok_s": (n - n0) / (now - t0), "blocks": most,
                         "kv_bytes": most * block_bytes})
            progress.update(task, completed=n)
            t0, n0, most = now, n, 0
    rows[-1]["finish"] = req.finish_reason if req.error is None else req.error
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    out, err = consoles(args.json)
    torch.set_num_threads(args.threads)
    results = {}
    with Progress(console=err, transient=True) as progress:
        for policy in args.policy_list:
            llm = LLM(args.model, dtype=args.dtype, threads=args.threads, progress=False, kv_policy=policy,
                      kv_cache_memory=args.kv_cache_memory, max_model_len=args.prompt_tokens + args.tokens + 1)
            prompt = corpus_ids(llm.tokenizer, args.prompt_tokens)
            limit = llm.config.max_position_embeddings
            want = args.tokens if policy.startswith("sinks") else min(args.tokens, limit - args.prompt_tokens)
            task = progress.add_task(policy or "full", total=want)
            results[policy] = stream(llm, prompt, want, args.segment, progress, task)
            del llm
    table = Table(title=f"One long stream on the paged engine: {args.model}, {args.dtype}, {args.threads} threads")
    for col in ("policy", "up to position", "decode tok/s", "vs baseline", "KV blocks held", "KV bytes held"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    base = {r["position"]: r["tok_s"] for r in results[args.policy_list[0]]}
    for policy, rows in results.items():
        for r in rows:
            ratio = f"{r['tok_s'] / base[r['position']]:.2f}x" if r["position"] in base else "-"
            table.add_row(policy or "full", f"{r['position']:,}", f"{r['tok_s']:.1f}", ratio, f"{r['blocks']:,}",
                          f"{r['kv_bytes'] / 2**20:.1f} MiB")
    out.print(table)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for policy, rows in results.items():
            x = [r["position"] for r in rows]
            ax1.plot(x, [r["tok_s"] for r in rows], marker="o", label=policy or "full")
            ax2.plot(x, [r["kv_bytes"] / 2**20 for r in rows], marker="o", label=policy or "full")
        for ax, label in ((ax1, "decode tok/s"), (ax2, "KV MiB held by the request")):
            ax.set_xlabel("position")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle("one long stream on the paged engine")
        save_figure(fig, args.plot, err)
    print_json(args, results=results)
    first = args.policy_list[0]
    record.save("bench_sinks_stream", "python benchmarks/bench_sinks_stream.py", argv, args.record_folder,
                threads=args.threads, config=vars(args),
                results={"policies": [{"policy": p, "segments": rows} for p, rows in results.items()]},
                timings={p: [r["tok_s"] for r in rows] for p, rows in results.items() if p != first},
                baseline_timings={first: [r["tok_s"] for r in results[first]]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
