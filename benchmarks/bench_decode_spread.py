"""Where batch-1 decode speed varies: between processes, or over time on the machine.

Two parts, each over `--variants` (default none:bfloat16, gguf and llama.cpp on the same GGUF):

1. **fresh**: `--processes` (10) fresh processes per variant, one after another with the
   variants interleaved; each loads, warms up and times one generate (as
   `bench_quantized_decode.py` does). Their spread is what a fresh-process benchmark sees.
2. **together**: `--together` (6) processes per variant loaded at once, then `--rounds` (5)
   rounds; a round times one generate in every process in turn (the order reverses each round,
   one process runs at a time). A process that is slow for a reason of its own (its memory
   layout, huge pages, where its threads sit) stays slow in every round; a slow minute of the
   machine slows every process measured in it. Reported: the spread of the process medians, of
   the round medians, and the share of the variance between rounds, between processes and left.

Workload: `--prompt-tokens` (200) of real text, `--new-tokens` (128) greedy tokens, batch 1,
`--threads` (2). Each run writes its record to `--record-dir` (default benchmarks/results;
the first variant is the baseline) and, with `--plot`, tok/s against time as a PNG.

    python benchmarks/bench_decode_spread.py --plot benchmarks/results/decode_spread.png   # the measured run
    python benchmarks/bench_decode_spread.py --processes 2 --together 2 --rounds 2 --new-tokens 16 --no-record
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_quantized_decode import LLAMACPP, llamacpp_inputs  # noqa: E402

from kvcache.bench import record
from kvcache.bench.common import consoles, run_main, save_figure
from kvcache.errors import KVCacheError
from kvcache.models.loader import DEFAULT_MODEL

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Process-to-process and over-time spread of batch-1 decode speed.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a GGUF model (default {DEFAULT_MODEL})")
    p.add_argument("--variants", default="none:bfloat16,gguf:bfloat16,llamacpp",
                   help="comma-separated quantization:dtype or llamacpp (default none:bfloat16,gguf:bfloat16,llamacpp)")
    p.add_argument("--processes", type=int, default=10, help="fresh processes per variant (default 10)")
    p.add_argument("--together", type=int, default=6, help="processes per variant alive at once (default 6)")
    p.add_argument("--rounds", type=int, default=5, help="rounds over the live processes (default 5)")
    p.add_argument("--prompt-tokens", type=int, default=200, help="prompt length in tokens (default 200)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--threads", type=int, default=2, help="threads of every process (default 2)")
    p.add_argument("--plot", default=None, help="write tok/s against time to this PNG")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    record.add_arguments(p)
    args = p.parse_args(argv)
    for name in ("processes", "together", "rounds", "prompt_tokens", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode speed excludes the first token)")
    args.variant_list = [v.strip() if v.strip() == LLAMACPP or ":" in v else f"{v.strip()}:bfloat16"
                         for v in args.variants.split(",") if v.strip()]
    if not args.variant_list:
        p.error("--variants is empty")
    args.record_folder = record.parse_folder(p, args)
    return args


class Live:
    """One loaded process of a variant, timing one generate per `time_one()`."""

    def __init__(self, args, variant: str, llamacpp: tuple[Path, Path] | None):
        if variant == LLAMACPP:
            gguf, ids_file = llamacpp
            cmd = [sys.executable, str(HERE / "llamacpp_worker.py"), "rounds", str(gguf), str(ids_file)]
        else:
            cmd = [sys.executable, str(HERE / "bench_quantized_decode.py"), "--worker", variant, "--serve-rounds",
                   "--model", args.model, "--prompt-tokens", str(args.prompt_tokens)]
        cmd += ["--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
        self.variant = variant
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
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


def fresh(args, llamacpp, start: float, err) -> dict[str, list[dict]]:
    """Part 1: a new process per measurement, the variants' order rotating."""
    out: dict[str, list[dict]] = {v: [] for v in args.variant_list}
    n = len(args.variant_list)
    for i in range(args.processes):
        for j in range(n):
            v = args.variant_list[(i + j) % n]
            live = Live(args, v, llamacpp)
            tok_s = live.time_one()
            live.close()
            out[v].append({"process": i, "t_s": time.perf_counter() - start, "decode_tok_s": tok_s})
            err.print(f"fresh {i + 1}/{args.processes} {v}: {tok_s:.1f} tok/s")
    return out


def together(args, llamacpp, start: float, err) -> dict[str, list[dict]]:
    """Part 2: every variant's processes alive at once, timed round after round."""
    lives = [Live(args, v, llamacpp) for _ in range(args.together) for v in args.variant_list]
    out: dict[str, list[dict]] = {v: [] for v in args.variant_list}
    try:
        for r in range(args.rounds):
            order = range(len(lives)) if r % 2 == 0 else reversed(range(len(lives)))
            for i in order:
                tok_s = lives[i].time_one()
                out[lives[i].variant].append({"process": i // len(args.variant_list), "round": r,
                                              "t_s": time.perf_counter() - start, "decode_tok_s": tok_s})
            err.print(f"round {r + 1}/{args.rounds} done")
    finally:
        for live in lives:
            live.close()
    return out


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


def summarize(args, fresh_runs: dict, together_runs: dict) -> dict:
    out = {}
    for v in args.variant_list:
        rows = together_runs[v]
        per_process = [statistics.median(r["decode_tok_s"] for r in rows if r["process"] == p)
                       for p in range(args.together)]
        per_round = [statistics.median(r["decode_tok_s"] for r in rows if r["round"] == k) for k in range(args.rounds)]
        out[v] = {"fresh": _spread([r["decode_tok_s"] for r in fresh_runs[v]]),
                  "together_all": _spread([r["decode_tok_s"] for r in rows]),
                  "together_process_medians": _spread(per_process),
                  "together_round_medians": _spread(per_round),
                  "variance_shares": variance_shares(rows)}
    return out


def plot(args, fresh_runs: dict, together_runs: dict, console) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(args.variant_list), 1, figsize=(9, 2.6 * len(args.variant_list)), sharex=True)
    for ax, v in zip([axes] if len(args.variant_list) == 1 else axes, args.variant_list):
        f = fresh_runs[v]
        ax.plot([r["t_s"] for r in f], [r["decode_tok_s"] for r in f], "o", color="black", label="fresh process")
        for p in range(args.together):
            rows = [r for r in together_runs[v] if r["process"] == p]
            ax.plot([r["t_s"] for r in rows], [r["decode_tok_s"] for r in rows], ".-", label=f"live process {p}")
        ax.set_title(v)
        ax.set_ylabel("decode tok/s")
    ax.set_xlabel("seconds since the start of the run")
    ax.legend(fontsize=7, ncol=4, loc="lower left")
    save_figure(fig, args.plot, console)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    console, err = consoles(args.json, width=130)
    llamacpp = llamacpp_inputs(args) if LLAMACPP in args.variant_list else None
    start = time.perf_counter()
    fresh_runs = fresh(args, llamacpp, start, err)
    together_runs = together(args, llamacpp, start, err)
    summary = summarize(args, fresh_runs, together_runs)
    for v, s in summary.items():
        f, pm, rm, sh = (s["fresh"], s["together_process_medians"], s["together_round_medians"],
                         s["variance_shares"])
        console.print(f"{v}: fresh {f['min']:.1f}-{f['max']:.1f} (median {f['median']:.1f}, x{f['max_over_min']:.2f}); "
                      f"live process medians {pm['min']:.1f}-{pm['max']:.1f} (x{pm['max_over_min']:.2f}), "
                      f"round medians {rm['min']:.1f}-{rm['max']:.1f} (x{rm['max_over_min']:.2f}); variance: "
                      f"rounds {sh['between_rounds']:.0%}, processes {sh['between_processes']:.0%}, "
                      f"left {sh['left']:.0%}")
    if args.plot:
        plot(args, fresh_runs, together_runs, console)
    if args.json:
        print(json.dumps(summary, indent=2))
    base = args.variant_list[0]
    record.save("bench_decode_spread", "python benchmarks/bench_decode_spread.py", argv, args.record_folder,
                threads=args.threads, config=record.config_of(args), results=summary,
                timings={v: {"fresh": fresh_runs[v], "together": together_runs[v]} for v in args.variant_list[1:]},
                baseline_timings={base: {"fresh": fresh_runs[base], "together": together_runs[base]}})
    return summary


if __name__ == "__main__":
    run_main(main)
