"""Speed of this checkout against an earlier commit: same machine, same run, fresh processes.

A change that reworks code without meaning to change speed must show it. This script checks
the earlier commit out into a temporary git worktree and runs each probe in a fresh Python
process per checkout (`PYTHONPATH=<checkout>/src`), old and new interleaved (the order
alternating per round), for `--runs` rounds; it reports medians and the new/old ratio.

Probes (default model, greedy, `--threads` threads):
- decode_fp32 / decode_bf16: `LLM.generate`, batch 1, a 200-token prompt, 128 new tokens:
  `metrics.decode_tok_s`;
- engine_bf16: 64 requests at once on the paged engine (prompts 64-512 tokens, 32-128 new
  tokens, seeded): generated tokens / wall time;
- eval4k_<policy>: `kvcache eval`'s decode speed (`eval.speed.decode_speed`) after 4,096
  context tokens, fp32 model, for the full, int8 and int4 caches.

    python benchmarks/bench_vs_commit.py --old fa9f30e --runs 5
    python benchmarks/bench_vs_commit.py --old HEAD~3 --runs 1 --probes decode_fp32   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBES: dict[str, str] = {
    "decode_fp32": """
import torch
from kvcache import LLM, SamplingParams
from kvcache.bench.common import corpus_ids
llm = LLM(dtype="float32", threads={threads}, progress=False, **FLOAT)
ids = corpus_ids(llm.tokenizer, 200)
sp = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
llm.generate([ids[:50]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm-up
out = llm.generate([ids], sp)[0]
print(json.dumps(out.metrics.decode_tok_s))
""",
    "engine_bf16": """
import random, time
from kvcache import LLM, SamplingParams
from kvcache.bench.common import corpus_ids
llm = LLM(dtype="bfloat16", threads={threads}, progress=False, kv_cache_memory="256MiB", **FLOAT)
ids = corpus_ids(llm.tokenizer, 4096)
rng = random.Random(0)
prompts, params = [], []
for i in range(64):
    start, n = rng.randrange(0, 3500), rng.randrange(64, 513)
    prompts.append(ids[start:start + n])
    params.append(SamplingParams(max_tokens=rng.randrange(32, 129), temperature=0.0, ignore_eos=True))
llm.generate(prompts[:4], [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)] * 4)  # warm-up
t0 = time.perf_counter()
outs = llm.generate(prompts, params)
dt = time.perf_counter() - t0
print(json.dumps(sum(len(o.token_ids) for o in outs) / dt))
""",
    "eval4k": """
from kvcache import LLM
from kvcache.eval.speed import decode_speed
llm = LLM(dtype="float32", threads={threads}, progress=False, **FLOAT)
r = decode_speed(llm, {policy!r}, context=4096, steps=32, repeats=3)
print(json.dumps(r.tok_s))
""",
}
#: Each side's float weights: a checkout whose LLM takes `quantization` is asked for "none" (its
#: default for the packaged GGUF may keep the file's quantized formats); an older one has only float.
PRELUDE = """import inspect, json
from kvcache import LLM
FLOAT = {"quantization": "none"} if "quantization" in inspect.signature(LLM).parameters else {}
"""
EVAL_POLICIES = {"full": None, "int8": "quantized:bits=8,group_size=64,residual=128",
                 "int4": "quantized:bits=4,group_size=64,residual=128"}


def probe_code(name: str, threads: int) -> str:
    """The Python source of one probe (its last stdout line is the measured number)."""
    if name == "decode_bf16":
        return PRELUDE + PROBES["decode_fp32"].replace('"float32"', '"bfloat16"').format(threads=threads)
    if name.startswith("eval4k_"):
        return PRELUDE + PROBES["eval4k"].format(threads=threads, policy=EVAL_POLICIES[name[7:]])
    return PRELUDE + PROBES[name].format(threads=threads)


ALL_PROBES = ["decode_fp32", "decode_bf16", "engine_bf16"] + [f"eval4k_{p}" for p in EVAL_POLICIES]


def run_probe(checkout: Path, name: str, threads: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(checkout / "src"), OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-c", probe_code(name, threads)], cwd=checkout, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: probe {name} failed in {checkout}: {done.stderr.strip().splitlines()[-1:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True, help="the earlier commit (anything git rev-parse accepts)")
    p.add_argument("--runs", type=int, default=5, help="fresh processes per probe and checkout (default 5)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--probes", default=",".join(ALL_PROBES), help=f"comma-separated, of {', '.join(ALL_PROBES)}")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    from kvcache.bench import record

    record.add_arguments(p)
    args = p.parse_args(argv)
    probes = [s.strip() for s in args.probes.split(",") if s.strip()]
    bad = [s for s in probes if s not in ALL_PROBES]
    if bad or args.runs < 1 or args.threads < 1:
        p.error(f"unknown probe {bad[0]!r}" if bad else "--runs and --threads must be at least 1")
    folder = record.parse_folder(p, args)
    old = subprocess.run(["git", "rev-parse", "--verify", args.old + "^{commit}"], cwd=REPO, capture_output=True,
                         text=True)
    if old.returncode != 0:
        p.error(f"--old {args.old!r} is not a commit of this repository")
    old_commit = old.stdout.strip()
    runs: dict[str, dict[str, list[float]]] = {name: {"old": [], "new": []} for name in probes}
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old_tree), old_commit], cwd=REPO, check=True)
        try:
            total, k, t0 = len(probes) * args.runs * 2, 0, time.perf_counter()
            for r in range(args.runs):
                for name in probes:
                    order = [("old", old_tree), ("new", REPO)]
                    for side, tree in order if r % 2 == 0 else order[::-1]:
                        runs[name][side].append(run_probe(tree, name, args.threads))
                        k += 1
                        print(f"[{k}/{total} {time.perf_counter() - t0:.0f}s] {name} {side}: "
                              f"{runs[name][side][-1]:.1f} tok/s", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=REPO)
    results = {}
    for name, sides in runs.items():
        old_m, new_m = statistics.median(sides["old"]), statistics.median(sides["new"])
        results[name] = {"old_tok_s": old_m, "new_tok_s": new_m, "ratio": new_m / old_m}
    print(f"{'probe':<14} {'old tok/s':>10} {'new tok/s':>10} {'new/old':>8}   (medians of {args.runs} processes each)",
          file=sys.stderr)
    for name, r in results.items():
        print(f"{name:<14} {r['old_tok_s']:>10.1f} {r['new_tok_s']:>10.1f} {r['ratio']:>8.3f}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=1))
    record.save("bench_vs_commit", "python benchmarks/bench_vs_commit.py", argv if argv is not None else sys.argv[1:],
                folder, threads=args.threads, config={**vars(args), "old_commit": old_commit},
                timings={n: s["new"] for n, s in runs.items()}, baseline_timings={n: s["old"] for n, s in runs.items()},
                results=results)
    return results


if __name__ == "__main__":
    main()
