"""Decode speed and capacity of the paged engine with float vs quantized KV blocks.

For each KV policy (`--policies`, the first is the baseline) and each batch size, B requests
with distinct `--context`-token prompts (real text) are prefilled once, then `--repeats` runs
of `--steps` decode steps of the whole batch are timed (the median is reported). Policies the
paged blocks cannot hold (KIVI with its exact tail, tiered) run on per-request caches in the same
batch; their bytes per token are the packed rate, plus an exact part per sequence that the
bandwidth share counts. Reported per format: KV bytes per token,
tokens a `--kv-budget` holds, decode tok/s, the ratio to the baseline at the same batch size,
and the share of the memory-bandwidth limit (weights + the batch's KV read per step, against
`--bandwidth-gbs`). Writes a PNG of tok/s against batch size with `--plot`.

    python benchmarks/bench_paged_formats.py --threads 2
    python benchmarks/bench_paged_formats.py --batch-sizes 1,16 --context 512 --json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.table import Table

from kvcache.api.llm import LLM
from kvcache.bench import record
from kvcache.bench.common import consoles, corpus_ids, print_json, save_figure
from kvcache.cache.paged_plan import paged_plan
from kvcache.cache.policies.grammar import parse_policy
from kvcache.cache.spec import format_bytes, parse_size
from kvcache.engine.sampling import SamplingParams
from kvcache.models.loader import DEFAULT_MODEL

DEFAULT_POLICIES = ("full;quantized:bits=8,key_axis=token,residual=0;"
                    "quantized:bits=4,group_size=32,key_axis=token,residual=0")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="';'-separated KV policies; the first is the baseline")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--context", type=int, default=1024, help="prompt tokens per request (default 1024)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per repeat (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="repeats; the median is reported (default 3)")
    p.add_argument("--kv-budget", default="256MiB", help="budget whose token capacity is reported (default 256MiB)")
    p.add_argument("--bandwidth-gbs", type=float, default=27.0, help="memory bandwidth, GB/s (default 27)")
    p.add_argument("--plot", default=None, metavar="PNG")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    record.add_arguments(p)
    a = p.parse_args(argv)
    a.batches = [int(x) for x in a.batch_sizes.split(",")]
    a.policy_list = [x.strip() for x in a.policies.split(";") if x.strip()]
    if min(a.batches) < 1 or a.context < 2 or a.steps < 1 or a.repeats < 1:
        p.error("batch sizes, --context, --steps and --repeats must be positive")
    a.record_folder = record.parse_folder(p, a)
    return a


def attended_tokens(policy: str, context: float) -> float:
    """Tokens one decode row reads: its whole context, or what a window / sinks policy keeps
    (the window plus, on average, half a 16-token block not yet given back)."""
    spec = parse_policy(policy)
    plan = paged_plan(spec)
    kept = (sum(plan.sinks) if plan.sinks else plan.window) if plan else None
    return context if kept is None else min(context, kept + 8)


def decode_tok_s(llm: LLM, prompts: list[list[int]], steps: int, repeats: int) -> list[float]:
    """Prefill every prompt once, then time `repeats` runs of `steps` decode steps of the whole
    batch: tokens/s of each run."""
    engine = llm.engine
    params = SamplingParams(max_tokens=steps * repeats + 2, temperature=0.0, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    while any(not r.output_token_ids for r in reqs):
        engine.step()
    speeds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        speeds.append(len(prompts) * steps / (time.perf_counter() - t0))
    engine.run_to_completion(reqs)
    engine.kv.reset_prefix_cache()
    return speeds


def main(argv=None) -> int:
    args = parse_args(argv)
    out, err = consoles(args.json)
    torch.set_num_threads(args.threads)
    budget = parse_size(args.kv_budget)
    rows = []
    weights_bytes = 0
    for policy in args.policy_list:
        probe = LLM(args.model, dtype=args.dtype, progress=False, kv_policy=policy, kv_cache_memory=1 << 20)
        bpt = probe.engine_bytes_per_token
        # a per-request policy cache (KIVI, tiered, ...) is granted its exact tail and sinks at their own cost
        footprint = probe.policy_footprint(2048)
        tokens = args.context + args.steps * args.repeats + 16
        need = max(args.batches) * (footprint.slots(tokens) if footprint is not None else tokens)
        fixed = footprint.exact_tokens * (footprint.exact - footprint.rate) if footprint is not None else 0
        llm = LLM(args.model, dtype=args.dtype, threads=args.threads, progress=False, kv_policy=policy,
                  kv_cache_memory=need * bpt, max_num_seqs=max(args.batches), max_num_batched_tokens=2048)
        weights_bytes = llm.model.bytes_read_per_token  # weights streamed once per decode step
        corpus = corpus_ids(llm.tokenizer)
        llm.generate([corpus[:64]], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
        for b in args.batches:
            prompts = [corpus[i * 997 : i * 997 + args.context] for i in range(b)]
            speeds = decode_tok_s(llm, prompts, args.steps, args.repeats)
            err.print(f"  {policy or 'full'} batch {b}: " + ", ".join(f"{x:.1f}" for x in speeds) + " tok/s")
            rows.append({"policy": policy, "batch": b, "bytes_per_token": bpt, "exact_bytes_per_seq": fixed,
                         "budget_tokens": budget // bpt,
                         "decode_tok_s": statistics.median(speeds), "runs": speeds})
        del llm
    base = {r["batch"]: r["decode_tok_s"] for r in rows if r["policy"] == args.policy_list[0]}
    for r in rows:
        r["vs_baseline"] = r["decode_tok_s"] / base[r["batch"]]
        kv_per_step = r["batch"] * attended_tokens(r["policy"], args.context + args.steps * args.repeats / 2) \
            * r["bytes_per_token"] + r["batch"] * r["exact_bytes_per_seq"]
        r["kv_read_per_step_bytes"] = kv_per_step
        steps_s = r["decode_tok_s"] / r["batch"]
        r["bandwidth_share"] = (weights_bytes + kv_per_step) * steps_s / (args.bandwidth_gbs * 1e9)
    table = Table(title=f"Paged KV formats: {args.model}, {args.dtype}, {args.threads} threads, context {args.context}")
    for col in ("policy", "bytes/token", f"tokens in {format_bytes(budget)}", "batch", "decode tok/s",
                "vs baseline", "bandwidth share"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for r in rows:
        table.add_row(r["policy"] or "full", f"{r['bytes_per_token']:,}", f"{r['budget_tokens']:,}", str(r["batch"]),
                      f"{r['decode_tok_s']:.1f}", f"{r['vs_baseline']:.2f}x", f"{r['bandwidth_share']:.0%}")
    out.print(table)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for policy in args.policy_list:
            pr = [r for r in rows if r["policy"] == policy]
            ax.plot([r["batch"] for r in pr], [r["decode_tok_s"] for r in pr], marker="o",
                    label=f"{policy or 'full'} ({pr[0]['bytes_per_token']:,} B/token)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode tok/s")
        ax.set_title(f"paged KV formats, context {args.context}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save_figure(fig, args.plot, err)
    print_json(args, rows=rows)
    first = args.policy_list[0]
    record.save("bench_paged_formats", "python benchmarks/bench_paged_formats.py", argv, args.record_folder,
                threads=args.threads, config=vars(args), results={"rows": rows},
                timings={f"{r['policy']} batch {r['batch']}": r["runs"] for r in rows if r["policy"] != first},
                baseline_timings={f"{r['policy']} batch {r['batch']}": r["runs"] for r in rows if r["policy"] == first})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
