"""n samples of one prompt against n separate requests: KV blocks held and wall time.

Workload: a `--prompt-tokens` prompt of real text, `--n` samples of `--new-tokens` tokens each
(temperature 0.8, seeds `--seed` + i, EOS ignored). Ours: one request with
`SamplingParams(n=...)`, which computes the prompt once and forks its blocks (the partly
filled last block copied once per sample). Baseline, same run: the same n requests submitted
together as separate requests with the prefix cache off, so each computes its prompt. Each
side is run `--repeats` times on its own engine, alternating; medians are reported. The
engine is stepped by hand to read the blocks in use after every step.

    python benchmarks/bench_n_samples.py --threads 2
    python benchmarks/bench_n_samples.py --prompt-tokens 64 --new-tokens 8 --repeats 1 --no-record

The goal (KV blocks at the peak) is the prompt's blocks + n x the output's blocks + n.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from kvcache.bench import record
from kvcache.bench.common import consoles, require_at_least_one, run_main
from kvcache.models.loader import DEFAULT_MODEL


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="n samples of one prompt vs n separate requests.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="bfloat16", help="model dtype (default bfloat16)")
    p.add_argument("--quantization", default="auto", help="weights (default auto)")
    p.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length (default 1024)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per sample (default 64)")
    p.add_argument("--n", type=int, default=8, help="samples (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of sample 0 (default 0)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    record.add_arguments(p)
    args = p.parse_args(argv)
    require_at_least_one(p, args, ("prompt_tokens", "new_tokens", "n", "repeats", "threads"))
    if args.n > 16:
        p.error("--n must be at most 16")
    args.record_folder = record.parse_folder(p, args)
    return args


def run(llm, prompt: list[int], args, forked: bool) -> dict:
    """One side's run on a fresh prefix cache: wall time, peak blocks in use, the tokens."""
    from kvcache.engine.sampling import SamplingParams

    engine = llm.engine
    engine.kv.reset_prefix_cache()
    base = dict(max_tokens=args.new_tokens, temperature=0.8, ignore_eos=True)
    t0 = time.perf_counter()
    if forked:
        reqs = list(engine.add_request(prompt, SamplingParams(n=args.n, seed=args.seed, **base)).group)
    else:
        reqs = [engine.add_request(prompt, SamplingParams(seed=args.seed + i, **base)) for i in range(args.n)]
    peak = 0
    while not all(r.finished for r in reqs):
        engine.step()
        peak = max(peak, engine.kv.usage()["blocks_used"])
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "peak_blocks": peak, "tokens": [list(r.output_token_ids) for r in reqs],
            "prefilled": engine.tokens_prefilled}


def main(argv: list[str] | None = None) -> dict:
    import torch

    from kvcache import LLM
    from kvcache.bench.common import corpus_ids

    args = parse_args(argv)
    console, err = consoles(args.json)
    torch.set_num_threads(args.threads)
    common = dict(dtype=args.dtype, quantization=args.quantization, progress=False, max_num_seqs=max(args.n, 16))
    ours = LLM(args.model, **common)
    separate = LLM(args.model, enable_prefix_caching=False, **common)
    prompt = corpus_ids(ours.tokenizer, args.prompt_tokens)
    bs = ours.engine.config.block_size
    from kvcache.engine.sampling import SamplingParams

    for llm in (ours, separate):  # first-call overheads, untimed
        llm.generate([prompt[:32]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    runs: dict[str, list[dict]] = {"n_samples": [], "separate": []}
    for rep in range(args.repeats):
        for side, llm in (("n_samples", ours), ("separate", separate))[:: 1 if rep % 2 == 0 else -1]:
            before = llm.engine.tokens_prefilled
            r = run(llm, prompt, args, side == "n_samples")
            r["prefilled"] -= before
            runs[side].append(r)
            err.print(f"repeat {rep + 1}/{args.repeats} {side}: {r['wall_s']:.2f} s, peak {r['peak_blocks']} blocks, "
                      f"{r['prefilled']} prompt tokens computed")
    same = runs["n_samples"][0]["tokens"] == runs["separate"][0]["tokens"]
    bound = -(-args.prompt_tokens // bs) + args.n * -(-args.new_tokens // bs) + args.n
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    result = {
        "block_size": bs, "peak_blocks": {k: max(r["peak_blocks"] for r in v) for k, v in runs.items()},
        "peak_bound": bound, "wall_s": med, "speedup": med["separate"] / med["n_samples"],
        "prompt_tokens_computed": {k: v[0]["prefilled"] for k, v in runs.items()},
        "samples_equal_separate_requests": same, "quantization": ours.quantization,
    }
    console.print(f"n={args.n} on a {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens each "
                  f"({args.dtype}, weights {ours.quantization}, {args.threads} threads): peak KV blocks "
                  f"{result['peak_blocks']['n_samples']} (bound {bound}) vs {result['peak_blocks']['separate']} "
                  f"for {args.n} separate requests; wall {med['n_samples']:.2f} s vs {med['separate']:.2f} s "
                  f"({result['speedup']:.2f}x); samples equal the separate seeded requests: {same}")
    if args.json:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
    strip = {k: [{x: y for x, y in r.items() if x != "tokens"} for r in v] for k, v in runs.items()}
    record.save("bench_n_samples", "python benchmarks/bench_n_samples.py", argv, args.record_folder,
                threads=args.threads, config=record.config_of(args),
                results=result, timings={"n_samples": strip["n_samples"]},
                baseline_timings={"separate": strip["separate"]})
    return result


if __name__ == "__main__":
    run_main(main)
