"""Needle in a haystack served by the paged engine: eviction policies against the full cache.

For each KV policy (`--policies`, the first is the baseline) every needle case (`kvcache.eval.needle`:
a fact planted at several depths of real filler, asked for at the end) goes to `LLM.generate` as
one prompt (context + question, the documented layout), all cases at once through the
continuous-batching scheduler. A paged `evict` policy compresses each prompt once after its
prefill (the question sits in the kept recent window). Reported per policy: needle accuracy,
the KV bytes a request holds at its end (prompt kept + generated), their ratio to the baseline,
the peak of blocks in use, and wall time. Writes a PNG of accuracy against KV bytes with `--plot`.

    python benchmarks/bench_paged_needle.py --threads 2 --plot out/paged_needle.png
    python benchmarks/bench_paged_needle.py --lengths 512 --depths 0.5 --policies "full;evict:scorer=snapkv,ratio=0.5"
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.table import Table

from kvcache.api.llm import LLM
from kvcache.bench import record
from kvcache.bench.common import consoles, print_json, save_figure
from kvcache.engine.sampling import SamplingParams
from kvcache.eval.needle import is_correct, make_cases, prompt_parts
from kvcache.models.loader import DEFAULT_MODEL

DEFAULT_POLICIES = ";".join(["full"] + [f"evict:scorer={s},ratio={r}" for s in ("snapkv", "knorm")
                                         for r in (0.5, 0.75, 0.875)])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="';'-separated KV policies; the first is the baseline")
    p.add_argument("--lengths", default="1024,2048", help="context lengths in tokens (default 1024,2048)")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="needle depths (default 0.1,...,0.9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--kv-cache-memory", default="1GiB")
    p.add_argument("--plot", default=None, metavar="PNG")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    record.add_arguments(p)
    a = p.parse_args(argv)
    a.policy_list = [x.strip() for x in a.policies.split(";") if x.strip()]
    a.length_list = [int(x) for x in a.lengths.split(",")]
    a.depth_list = [float(x) for x in a.depths.split(",")]
    a.record_folder = record.parse_folder(p, a)
    return a


def run_policy(args, policy: str) -> dict:
    llm = LLM(args.model, dtype=args.dtype, threads=args.threads, progress=False, kv_policy=policy,
              kv_cache_memory=args.kv_cache_memory)
    cases = make_cases(llm.tokenizer, args.length_list, args.depth_list, args.seed)
    prompts = [sum(prompt_parts(llm.tokenizer, c), []) for c in cases]
    engine, peak = llm.engine, 0

    def watch(_):
        nonlocal peak
        peak = max(peak, engine.stats()["blocks_used"])

    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0)
    reqs = [engine.add_request(p, params, eos_ids=llm.eos_ids) for p in prompts]
    t0 = time.perf_counter()
    engine.run_to_completion(reqs, on_step=watch)
    wall = time.perf_counter() - t0
    outs = [r.to_output() for r in reqs]
    correct = [is_correct(o.text, c.answer) for o, c in zip(outs, cases)]
    return {"policy": policy, "cases": len(cases), "accuracy": sum(correct) / len(correct),
            "correct": {c.id: ok for c, ok in zip(cases, correct)},
            "kv_bytes_per_request": statistics.mean(o.metrics.kv_cache_bytes for o in outs),
            "peak_blocks": peak, "block_bytes": engine.config.block_size * engine.storage.bytes_per_token,
            "tokens_evicted": engine.stats()["tokens_evicted"], "wall_s": wall,
            "tok_s": (sum(len(p) for p in prompts) + sum(len(o.token_ids) for o in outs)) / wall}


def main(argv=None) -> int:
    args = parse_args(argv)
    out, err = consoles(args.json)
    torch.set_num_threads(args.threads)
    rows = []
    for policy in args.policy_list:
        rows.append(run_policy(args, policy))
        r = rows[-1]
        err.print(f"  {policy}: {r['accuracy']:.0%} of {r['cases']} in {r['wall_s']:.1f} s")
    base = rows[0]["kv_bytes_per_request"]
    table = Table(title=f"Needle on the paged engine: {args.model}, {args.dtype}, {args.threads} threads, "
                        f"contexts {args.lengths}")
    for col in ("policy", "accuracy", "KV bytes / request", "vs baseline", "peak blocks", "tok/s (all cases)"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for r in rows:
        r["kv_ratio"] = r["kv_bytes_per_request"] / base
        table.add_row(r["policy"], f"{r['accuracy']:.0%}", f"{r['kv_bytes_per_request'] / 2**20:.1f} MiB",
                      f"{r['kv_ratio']:.2f}x", f"{r['peak_blocks']:,}", f"{r['tok_s']:.0f}")
    out.print(table)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for r in rows:
            ax.scatter(r["kv_ratio"], r["accuracy"], s=40)
            ax.annotate(r["policy"].replace("evict:", ""), (r["kv_ratio"], r["accuracy"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel("KV bytes per request vs full")
        ax.set_ylabel("needle accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.set_title("needle in a haystack on the paged engine")
        save_figure(fig, args.plot, err)
    print_json(args, rows=rows)
    record.save("bench_paged_needle", "python benchmarks/bench_paged_needle.py", argv, args.record_folder,
                threads=args.threads, config=vars(args), results={"rows": rows},
                timings={r["policy"]: {"wall_s": [r["wall_s"]]} for r in rows[1:]},
                baseline_timings={rows[0]["policy"]: {"wall_s": [rows[0]["wall_s"]]}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
