"""Decode speed: our engine vs `transformers` generate, same weights, same dtype, same machine.

Workload (per dtype): greedy, batch 1, a `--prompt-tokens` prompt of real text (Python's
`pydoc_data.topics`), `--new-tokens` new tokens with EOS ignored.

- ours:   `LLM.generate` -> `metrics.decode_tok_s` (tokens after the first / time spent on them)
          and `metrics.ttft_s`.
- theirs: `AutoModelForCausalLM.generate` on the same HF folder, timed end to end for N new
          tokens and for a prefill-only run (1 new token); decode tok/s = (N - 1) / (t_N - t_1),
          ttft = t_1 (medians).

Each repeat runs ours and theirs back to back (order alternating per repeat), after one
warm-up of each; medians are reported. Achieved memory bandwidth of our decode is
(weight bytes + KV bytes read per step) * tok/s, compared with `--bandwidth-gbs`.

    python benchmarks/bench_vs_transformers.py                      # full run
    python benchmarks/bench_vs_transformers.py --new-tokens 16 --repeats 1 --dtypes float32
    python benchmarks/bench_vs_transformers.py --json > results.json

Each run writes its record (command, commit, CPU, every repeat of both sides) to
`--record-dir` (default benchmarks/results); `--no-record` writes none.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvcache.api.llm import LLM, parse_dtype
from kvcache.bench import record
from kvcache.bench.common import consoles, corpus_ids, quiet_transformers, run_main
from kvcache.engine.sampling import SamplingParams
from kvcache.models.loader import DEFAULT_MODEL

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class DtypeResult:
    dtype: str
    ours_decode_tok_s: float
    hf_decode_tok_s: float
    ours_ttft_s: float
    hf_ttft_s: float
    bytes_per_step: int
    gbs: float
    bandwidth_fraction: float
    tokens_match: int  # leading generated tokens where ours == theirs
    new_tokens: int
    ours_runs: dict = field(default_factory=dict)  # every timed repeat: decode_tok_s, ttft_s
    hf_runs: dict = field(default_factory=dict)  # every timed repeat: total_s (N new tokens), prefill_s (1)

    @property
    def speedup(self) -> float:
        return self.ours_decode_tok_s / self.hf_decode_tok_s if self.hf_decode_tok_s > 0 else float("nan")

    def to_dict(self, prompt_tokens: int, threads: int) -> dict:
        return {
            "dtype": self.dtype,
            "ours_decode_tok_s": self.ours_decode_tok_s,
            "hf_decode_tok_s": self.hf_decode_tok_s,
            "speedup": self.speedup,
            "ours_ttft_s": self.ours_ttft_s,
            "hf_ttft_s": self.hf_ttft_s,
            "gbs": self.gbs,
            "bandwidth_fraction": self.bandwidth_fraction,
            "tokens_match": self.tokens_match,
            "new_tokens": self.new_tokens,
            "prompt_tokens": prompt_tokens,
            "threads": threads,
        }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Compare our decode speed with transformers' generate.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes (default float32,bfloat16)")
    p.add_argument("--kernels", default="auto", choices=["auto", "torch", "onednn", "native"],
                   help="our matmul kernels (auto: native for fp32 on CPU, prefill bit-exact with transformers; onednn for bf16)")
    p.add_argument("--prompt-tokens", type=int, default=200, help="prompt length in tokens (default 200)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--bandwidth-gbs", type=float, default=27.0,
                   help="memory bandwidth limit of this machine in GB/s (default 27)")
    p.add_argument("--json", action="store_true", help="print one JSON list on stdout (table goes to stderr)")
    record.add_arguments(p)
    args = p.parse_args(argv)
    if args.prompt_tokens < 1:
        p.error("--prompt-tokens must be at least 1")
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode speed excludes the first token)")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.threads < 1:
        p.error("--threads must be at least 1")
    if args.bandwidth_gbs <= 0:
        p.error("--bandwidth-gbs must be positive")
    args.dtype_list = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not args.dtype_list:
        p.error("--dtypes is empty")
    args.record_folder = record.parse_folder(p, args)
    return args


def leading_match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def bench_dtype(args, dtype_name: str, progress: Progress, console: Console) -> DtypeResult:
    from transformers import AutoModelForCausalLM

    dt = parse_dtype(dtype_name)
    name = _DTYPE_NAMES.get(dt, str(dt))
    n_new, n_prompt = args.new_tokens, args.prompt_tokens
    steps = 2 * (args.repeats + 1)
    task = progress.add_task(f"{name}: loading", total=steps)

    llm = LLM(args.model, dtype=dt, progress=False, kernels=args.kernels, quantization="none")  # transformers' weights
    ids = corpus_ids(llm.tokenizer, n_prompt)
    if n_prompt + n_new > llm.max_model_len:
        raise SystemExit(f"prompt + new tokens ({n_prompt + n_new}) exceed max_model_len {llm.max_model_len}")
    hf = AutoModelForCausalLM.from_pretrained(str(llm.model_dir), dtype=dt).eval()
    params = SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True)
    input_ids = torch.tensor([ids], dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)
    pad_id = llm.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = llm.config.eos_token_ids[0] if llm.config.eos_token_ids else 0

    def run_ours():
        llm.engine.kv.reset_prefix_cache()  # a cold prompt each run, like theirs
        out = llm.generate([ids], params)[0]
        if len(out.token_ids) != n_new:
            raise RuntimeError(f"ours generated {len(out.token_ids)} tokens, expected {n_new}")
        return out

    def run_hf(max_new: int) -> tuple[float, list[int]]:
        with torch.inference_mode():
            t0 = time.perf_counter()
            seq = hf.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new,
                              min_new_tokens=max_new, do_sample=False, pad_token_id=pad_id)
            dt_s = time.perf_counter() - t0
        new = seq[0, n_prompt:].tolist()
        if len(new) != max_new:
            raise RuntimeError(f"transformers generated {len(new)} tokens, expected {max_new}")
        return dt_s, new

    def run_theirs() -> tuple[float, float, list[int]]:
        t_total, toks = run_hf(n_new)
        t_prefill, _ = run_hf(1)
        return t_total, t_prefill, toks

    ours_tok_s, ours_ttft, hf_total, hf_prefill = [], [], [], []
    ours_tokens = hf_tokens = None
    for rep in range(args.repeats + 1):  # rep 0 = warm-up
        label = "warm-up" if rep == 0 else f"repeat {rep}/{args.repeats}"
        order = ("ours", "theirs") if rep % 2 == 0 else ("theirs", "ours")
        for who in order:
            progress.update(task, description=f"{name}: {label} ({who})")
            if who == "ours":
                out = run_ours()
                ours_tokens = out.token_ids
                if rep:
                    ours_tok_s.append(out.metrics.decode_tok_s)
                    ours_ttft.append(out.metrics.ttft_s)
            else:
                t_total, t_prefill, hf_tokens = run_theirs()
                if rep:
                    hf_total.append(t_total)
                    hf_prefill.append(t_prefill)
            progress.advance(task)
    progress.update(task, description=f"{name}: done")

    ours = statistics.median(ours_tok_s)
    t_tot, t_pre = statistics.median(hf_total), statistics.median(hf_prefill)
    theirs = (n_new - 1) / (t_tot - t_pre) if t_tot > t_pre else float("nan")
    bytes_per_step = llm.model.bytes_read_per_token + int(llm.kv_bytes_per_token * (n_prompt + n_new / 2))
    gbs = bytes_per_step * ours / 1e9
    match = leading_match(ours_tokens, hf_tokens)
    if match < n_new:
        console.print(f"[yellow]{name}: greedy tokens diverge from transformers at token {match} "
                      f"(ours {ours_tokens[match]}, theirs {hf_tokens[match]})[/yellow]")
    del llm, hf
    gc.collect()
    return DtypeResult(name, ours, theirs, statistics.median(ours_ttft), t_pre, bytes_per_step, gbs,
                       gbs / args.bandwidth_gbs, match, n_new,
                       {"decode_tok_s": ours_tok_s, "ttft_s": ours_ttft},
                       {"total_s": hf_total, "prefill_s": hf_prefill})


def results_table(results: list[DtypeResult], args) -> Table:
    t = Table(box=box.SIMPLE_HEAD, title=f"Decode vs transformers: {args.model}, prompt {args.prompt_tokens}, "
                    f"{args.new_tokens} new, batch 1, greedy, {args.threads} threads, "
                    f"median of {args.repeats}")
    for col in ("dtype", "ours\ntok/s", "theirs\ntok/s", "ratio", "MB/\nstep", "GB/s",
                f"of {args.bandwidth_gbs:g}\nGB/s", "ours\nTTFT ms", "theirs\nTTFT ms", "tokens\nmatch"):
        t.add_column(col, justify="left" if col == "dtype" else "right", no_wrap=True)
    for r in results:
        t.add_row(r.dtype, f"{r.ours_decode_tok_s:.1f}", f"{r.hf_decode_tok_s:.1f}", f"{r.speedup:.2f}x",
                  f"{r.bytes_per_step / 1e6:.1f}", f"{r.gbs:.1f}", f"{r.bandwidth_fraction:.0%}",
                  f"{r.ours_ttft_s * 1e3:.0f}", f"{r.hf_ttft_s * 1e3:.0f}",
                  f"{r.tokens_match}/{r.new_tokens}")
    return t


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_transformers()
    console, err = consoles(args.json, width=120)
    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=False) as progress:
        for d in args.dtype_list:
            results.append(bench_dtype(args, d, progress, err))
    console.print(results_table(results, args))
    rows = [r.to_dict(args.prompt_tokens, args.threads) for r in results]
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        sys.stdout.flush()
    record.save("bench_vs_transformers", "python benchmarks/bench_vs_transformers.py", argv, args.record_folder,
                threads=args.threads, config=vars(args), results=rows,
                timings={r.dtype: r.ours_runs for r in results}, baseline_timings={r.dtype: r.hf_runs for r in results})
    return rows


if __name__ == "__main__":
    run_main(main)
