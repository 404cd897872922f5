"""Where batch-1 decode speed varies: between processes, or over time on the machine.

Per variant (`--variants`, default none:bfloat16, gguf and llama.cpp on the same GGUF),
`--together` (4) processes are loaded and kept alive; then `--rounds` (10) rounds each time one
generate in every live process in turn and in one fresh process per variant (loaded, warmed up
and timed once, as `bench_quantized_decode.py` measures); one process runs at a time and the
order reverses each round. A process that is slow for a reason of its own (its memory layout,
huge pages, where its threads sit) stays slow in every round; a slow minute of the machine
slows every process measured in it. Reported per variant: the spread of the fresh processes
(what a fresh-process benchmark sees), of the live processes' medians and of the rounds'
medians, the share of the live measurements' variance between rounds, between processes and
left, and each fresh process against the live processes of its own round.

Workload: `--prompt-tokens` (200) of real text, `--new-tokens` (128) greedy tokens, batch 1,
`--threads` (2). Each run writes its record to `--record-dir` (default benchmarks/results;
the first variant is the baseline) and, with `--plot`, tok/s against time as a PNG.

    python benchmarks/bench_decode_spread.py --plot docs/decode_spread.png   # the measured run
    python benchmarks/bench_decode_spread.py --together 2 --rounds 2 --new-tokens 16 --no-record
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_quantized_decode import (LLAMACPP, SOLO, add_workload_arguments, check_workload, llamacpp_inputs,
                                    our_variant, worker_env)

from kvcache.bench import record
from kvcache.bench.common import consoles, require_at_least_one, run_main, save_figure
from kvcache.errors import KVCacheError

HERE = Path(__file__).resolve().parent
NO_MMAP = "@nommap"  # llamacpp@nommap: llama.cpp reads the weights into its own memory, as ours hold a copy


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Process-to-process and over-time spread of batch-1 decode speed.")
    add_workload_arguments(p)
    p.add_argument("--variants", default="none:bfloat16,gguf:bfloat16,llamacpp",
                   help="comma-separated quantization[:dtype][@thp], solo, llamacpp or llamacpp@nommap (default "
                        "none:bfloat16,gguf:bfloat16,llamacpp; @thp: transparent huge pages, see bench_quantized_decode; "
                        "@nommap: llama.cpp reads the weights into its own memory instead of mapping the file)")
    p.add_argument("--together", type=int, default=4, help="live processes per variant (default 4)")
    p.add_argument("--rounds", type=int, default=10,
                   help="rounds, each over the live processes and one fresh process per variant (default 10)")
    p.add_argument("--plot", default=None, help="write tok/s against time to this PNG")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    record.add_arguments(p)
    args = p.parse_args(argv)
    check_workload(p, args)
    require_at_least_one(p, args, ("together", "rounds"))
    args.variant_list = []
    for v in (v.strip() for v in args.variants.split(",") if v.strip()):
        if v.startswith(LLAMACPP):
            if v not in (LLAMACPP, LLAMACPP + NO_MMAP):
                p.error(f"unknown variant '{v}' (llama.cpp runs as {LLAMACPP} or {LLAMACPP + NO_MMAP})")
            args.variant_list.append(v)
            continue
        args.variant_list.append(v if v == SOLO else our_variant(p, v))
    if not args.variant_list:
        p.error("--variants is empty")
    args.record_folder = record.parse_folder(p, args)
    return args


class Live:
    """One loaded process of a variant, timing one generate per `time_one()`."""

    def __init__(self, args, variant: str, llamacpp: tuple[Path, Path] | None):
        if variant.startswith(LLAMACPP):
            gguf, ids_file = llamacpp
            cmd = [sys.executable, str(HERE / "llamacpp_worker.py"), "rounds", str(gguf), str(ids_file)]
            cmd += ["--no-mmap"] if variant.endswith(NO_MMAP) else []
        else:
            cmd = [sys.executable, str(HERE / "bench_quantized_decode.py"), "--worker", variant, "--serve-rounds",
                   "--model", args.model, "--prompt-tokens", str(args.prompt_tokens)]
        cmd += ["--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
        self.variant = variant
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=worker_env(variant))
        self._reply()  # {"ready": true}

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            err = (self.proc.stderr.read().strip() or "no output").splitlines()
            raise KVCacheError(f"A {self.variant} process stopped: {err[-1]}")
        return json.loads(line)

    def time_one(self) -> float:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._reply()["decode_tok_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def measure_rounds(args, llamacpp, err) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """(live, fresh) measurements per variant: every round times each live process and one new
    process per variant, the order reversed every other round."""
    lives = [Live(args, v, llamacpp) for _ in range(args.together) for v in args.variant_list]
    slots = [(i, lv.variant) for i, lv in enumerate(lives)] + [(None, v) for v in args.variant_list]
    live: dict[str, list[dict]] = {v: [] for v in args.variant_list}
    fresh: dict[str, list[dict]] = {v: [] for v in args.variant_list}
    start = time.perf_counter()
    try:
        for r in range(args.rounds):
            for i, v in slots if r % 2 == 0 else reversed(slots):
                if i is None:
                    one = Live(args, v, llamacpp)
                    tok_s = one.time_one()
                    one.close()
                    fresh[v].append({"round": r, "t_s": time.perf_counter() - start, "decode_tok_s": tok_s})
                else:
                    tok_s = lives[i].time_one()
                    live[v].append({"process": i // len(args.variant_list), "round": r,
                                    "t_s": time.perf_counter() - start, "decode_tok_s": tok_s})
            err.print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{v} fresh {fresh[v][-1]['decode_tok_s']:.1f}" for v in args.variant_list))
    finally:
        for lv in lives:
            lv.close()
    return live, fresh


def variance_shares(rows: list[dict]) -> dict:
    """Shares of the total sum of squares between rounds, between processes, and left (a
    two-way layout with one measurement per round and process)."""
    vals = [r["decode_tok_s"] for r in rows]
    mean = statistics.fmean(vals)
    total = sum((v - mean) ** 2 for v in vals)
    by = {}
    for key in ("round", "process"):
        groups: dict[int, list[float]] = {}
        for r in rows:
            groups.setdefault(r[key], []).append(r["decode_tok_s"])
        by[key] = sum(len(g) * (statistics.fmean(g) - mean) ** 2 for g in groups.values())
    share = (lambda x: x / total) if total > 0 else (lambda x: 0.0)
    return {"between_rounds": share(by["round"]), "between_processes": share(by["process"]),
            "left": share(total - by["round"] - by["process"])}


def _spread(vals: list[float]) -> dict:
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "max_over_min": max(vals) / min(vals)}


def summarize(args, live: dict, fresh: dict) -> dict:
    out = {}
    for v in args.variant_list:
        rows = live[v]
        per_process = [statistics.median(r["decode_tok_s"] for r in rows if r["process"] == p)
                       for p in range(args.together)]
        per_round = [statistics.median(r["decode_tok_s"] for r in rows if r["round"] == k) for k in range(args.rounds)]
        vs_round = [f["decode_tok_s"] / per_round[f["round"]] for f in fresh[v]]
        out[v] = {"fresh": _spread([r["decode_tok_s"] for r in fresh[v]]),
                  "live_all": _spread([r["decode_tok_s"] for r in rows]),
                  "live_process_medians": _spread(per_process),
                  "live_round_medians": _spread(per_round),
                  "fresh_over_its_round": _spread(vs_round),
                  "variance_shares": variance_shares(rows)}
    return out


def plot(args, live: dict, fresh: dict, console) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(args.variant_list), 1, figsize=(9, 2.6 * len(args.variant_list)), sharex=True)
    for ax, v in zip([axes] if len(args.variant_list) == 1 else axes, args.variant_list):
        f = fresh[v]
        ax.plot([r["t_s"] for r in f], [r["decode_tok_s"] for r in f], "o", color="black", label="fresh process")
        for p in range(args.together):
            rows = [r for r in live[v] if r["process"] == p]
            ax.plot([r["t_s"] for r in rows], [r["decode_tok_s"] for r in rows], ".-", label=f"live process {p}")
        ax.set_title(v)
        ax.set_ylabel("decode tok/s")
    ax.set_xlabel("seconds since the start of the run")
    ax.legend(fontsize=7, ncol=4, loc="lower left")
    save_figure(fig, args.plot, console)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    console, err = consoles(args.json, width=130)
    llamacpp = llamacpp_inputs(args) if any(v.startswith(LLAMACPP) for v in args.variant_list) else None
    live, fresh = measure_rounds(args, llamacpp, err)
    summary = summarize(args, live, fresh)
    for v, s in summary.items():
        f, pm, rm, fr, sh = (s["fresh"], s["live_process_medians"], s["live_round_medians"], s["fresh_over_its_round"],
                             s["variance_shares"])
        console.print(f"{v}: fresh {f['min']:.1f}-{f['max']:.1f} (median {f['median']:.1f}, x{f['max_over_min']:.2f}), "
                      f"{fr['median']:.2f} of their round's live median; live process medians "
                      f"{pm['min']:.1f}-{pm['max']:.1f} (x{pm['max_over_min']:.2f}), round medians "
                      f"{rm['min']:.1f}-{rm['max']:.1f} (x{rm['max_over_min']:.2f}); variance: rounds "
                      f"{sh['between_rounds']:.0%}, processes {sh['between_processes']:.0%}, left {sh['left']:.0%}")
    if args.json:
        print(json.dumps(summary, indent=2))
    base = args.variant_list[0]
    record.save("bench_decode_spread", "python benchmarks/bench_decode_spread.py", argv, args.record_folder,
                threads=args.threads, config=record.config_of(args), results=summary,
                timings={v: {"live": live[v], "fresh": fresh[v]} for v in args.variant_list[1:]},
                baseline_timings={base: {"live": live[base], "fresh": fresh[base]}})
    if args.plot:  # after the record, which notes whether the tree was clean (the plot may live in it)
        plot(args, live, fresh, console)
    return summary


if __name__ == "__main__":
    run_main(main)
