"""Serving throughput, KV capacity and prefix caching of the paged engine.

Workload: `--num-requests` requests (seed `--seed`), prompt lengths in [`--min-prompt`,
`--max-prompt`] and output lengths in [`--min-output`, `--max-output`], both lognormal
(long-tailed like chat traffic) clipped to their range. Prompts are real text (Python's
`pydoc_data.topics`, tokenized with the model's tokenizer) taken at different offsets, so no
two share a prefix; outputs are greedy with EOS ignored, so every request generates exactly
its length.

1. Throughput, tokens/s = (prompt + generated tokens) / wall time, and generated tokens/s:
   a. ours, every request at once through `LLM.generate` (continuous batching);
   b. ours, the same requests one by one (`LLM.generate([p], [sp])` in a loop);
   c. `transformers` generate, left-padded batches of 8 in workload order (same weights,
      same dtype); only each request's own prompt and requested output count;
   d. `llama-cpp-python` on the same GGUF, one by one (skipped when not installed).
   `--max-requests-baseline N` runs b, c and d on the first N requests only. `--repeats N`
   runs each of a-d N times (a and b interleaved) and reports the median wall times.
2. Capacity in a fixed `--kv-budget`: the workload runs through `LLMEngine.run_to_completion`
   with a per-step probe (blocks used, tokens held, requests resident). Here, as from a chat
   client, every request carries `max_tokens` = `--max-output` (the cap) and ends at its length
   as if the model emitted EOS there (the probe aborts it), so the scheduler does not know any
   length in advance. Compared with how many requests fit if each reserved max_model_len
   tokens, or prompt + max_tokens, up front (and, for reference, prompt + its exact output,
   which only an oracle could reserve).
3. Prefix caching: `--prefix-requests` requests sharing a `--prefix-tokens` system prompt plus
   a distinct ~`--question-tokens` question each, submitted together, on a fresh LLM with
   prefix caching on and on one with it off: TTFT (queueing included), hit rate, wall time.

    python benchmarks/bench_throughput.py                                   # full run
    python benchmarks/bench_throughput.py --num-requests 6 --max-prompt 128 --max-output 16 \\
        --skip-hf --skip-llamacpp                                           # seconds
    python benchmarks/bench_throughput.py --json > throughput.json
    python benchmarks/bench_throughput.py --plot out/throughput.png
    python benchmarks/bench_throughput.py --kv-policy full --kv-policy quantized:bits=8,key_axis=token,residual=0

Several `--kv-policy` values compare policies within one run: every policy's engine is loaded
once, 2a and 2b run interleaved over the policies in each repeat, the baselines (c, d) once.
Each run writes its record (command, commit, CPU, every wall time of ours and of the
baselines) to `--record-dir` (default benchmarks/results); `--no-record` writes none.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kvcache.api.llm import LLM, parse_dtype
from kvcache.cache.manager import RELEASED
from kvcache.cache.policies.grammar import parse_policy
from kvcache.cache.spec import KVFormat, ModelShape, format_bytes, kv_bytes_per_token, parse_size
from kvcache.bench import record
from kvcache.bench.common import (consoles, corpus_ids, machine_info, quiet_transformers, require_at_least_one,
                                  run_main)
from kvcache.engine.config import quant_format
from kvcache.engine.sampling import SamplingParams
from kvcache.errors import KVCacheError
from kvcache.models.loader import DEFAULT_MODEL, read_hf_config, resolve_model_dir

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# goals (ours vs the others)
GOAL_VS_ONE_BY_ONE = 5.0
GOAL_VS_HF = 2.0
GOAL_VS_LLAMACPP = 3.0
GOAL_VS_MAX_LEN_RESERVE = 3.0
GOAL_VS_FULL_RESERVE = 1.5
GOAL_WASTE = 0.04
GOAL_PREFIX_TTFT = 5.0


# ----------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Throughput, KV capacity and prefix caching of the paged engine.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", help="weights and KV dtype (default float32)")
    p.add_argument("--kernels", default="auto", choices=["auto", "torch", "onednn", "native"],
                   help="our matmul kernels (auto: native for fp32 on CPU, onednn for bf16)")
    p.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads (default 2)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--num-requests", type=int, default=64, help="requests in the workload (default 64)")
    p.add_argument("--max-prompt", type=int, default=1024, help="longest prompt in tokens (default 1024)")
    p.add_argument("--min-prompt", type=int, default=None,
                   help="shortest prompt in tokens (default max-prompt / 16, i.e. 64)")
    p.add_argument("--max-output", type=int, default=256, help="longest output in tokens (default 256)")
    p.add_argument("--min-output", type=int, default=None,
                   help="shortest output in tokens (default max-output / 8, i.e. 32)")
    p.add_argument("--kv-budget", default="256MiB", help="KV cache memory of every engine run (default 256MiB)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--kv-policy", action="append", default=None, metavar="POLICY",
                   help="KV policy of our engine runs, e.g. quantized:bits=8,key_axis=token,residual=0 "
                        "(paged blocks) or quantized:bits=4 (KIVI, per-request caches); repeat the flag (or "
                        "separate policies with ';') to compare several in one run (default: full, the model dtype)")
    p.add_argument("--quantization", action="append", default=None, choices=["auto", "none", "gguf", "int8", "int4"],
                   help="weights of our engine runs (repeat to compare several in one run, each with every "
                        "--kv-policy; default none: the float weights the transformers baseline runs)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="engine: most requests per step (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="engine: most tokens per step (default 512)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run each throughput measurement (2a-2d) this many times, ours interleaved, and report "
                        "median wall times (default 1)")
    p.add_argument("--hf-batch-size", type=int, default=8, help="transformers batch size (default 8)")
    p.add_argument("--max-requests-baseline", type=int, default=None, metavar="N",
                   help="run the slow baselines (one by one, transformers, llama.cpp) on the first N "
                        "requests only (default: all)")
    p.add_argument("--skip-one-by-one", action="store_true", help="skip ours one request at a time")
    p.add_argument("--skip-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--skip-llamacpp", action="store_true", help="skip the llama-cpp-python baseline")
    p.add_argument("--skip-capacity", action="store_true", help="skip the KV capacity run")
    p.add_argument("--skip-prefix", action="store_true", help="skip the prefix-caching runs")
    p.add_argument("--prefix-requests", type=int, default=32, help="prefix test: requests (default 32)")
    p.add_argument("--prefix-tokens", type=int, default=1000, help="prefix test: shared prompt tokens (default 1000)")
    p.add_argument("--question-tokens", type=int, default=30,
                   help="prefix test: tokens of each distinct question (default 30)")
    p.add_argument("--prefix-max-tokens", type=int, default=8, help="prefix test: tokens to generate (default 8)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="write a PNG of the capacity run over time (generated tok/s, KV memory, requests)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (table goes to stderr)")
    record.add_arguments(p)
    a = p.parse_args(argv)
    if a.min_prompt is None:
        a.min_prompt = max(1, a.max_prompt // 16)
    if a.min_output is None:
        a.min_output = max(1, a.max_output // 8)
    require_at_least_one(p, a, ("threads", "num_requests", "max_prompt", "min_prompt", "max_output", "min_output",
                                "block_size", "max_num_seqs", "max_num_batched_tokens", "hf_batch_size", "repeats",
                                "prefix_requests", "prefix_tokens", "question_tokens", "prefix_max_tokens"))
    if a.min_prompt > a.max_prompt:
        p.error("--min-prompt is larger than --max-prompt")
    if a.min_output > a.max_output:
        p.error("--min-output is larger than --max-output")
    if a.max_requests_baseline is not None and a.max_requests_baseline < 1:
        p.error("--max-requests-baseline must be at least 1")
    try:
        a.kv_budget_bytes = parse_size(a.kv_budget)
        parse_dtype(a.dtype)
        a.variants = variants(policy_list(a.kv_policy), a.quantization or ["none"])
        a.kv_policies = list(a.variants)
        a.record_folder = record.folder_from_args(a)
    except KVCacheError as exc:
        p.error(str(exc))
    return a


def variants(policies: list[str], quantizations: list[str]) -> dict[str, tuple[str, str]]:
    """Our engine runs, label -> (KV policy, weight quantization): every policy with every
    quantization; a label is the policy alone when one quantization is asked for."""
    quantizations = list(dict.fromkeys(quantizations))
    return {(p if len(quantizations) == 1 else f"{p} [{q} weights]"): (p, q) for p in policies for q in quantizations}


def policy_list(values: list[str] | None) -> list[str]:
    """The `--kv-policy` values (each may hold several, separated by ';'), checked, in order,
    without repeats; ["full"] when none was given."""
    if values is None:
        return ["full"]
    policies = []
    for value in values:
        for text in value.split(";"):
            text = text.strip()
            if text and text not in policies:
                parse_policy(text)  # KVCacheError names the mistake
                policies.append(text)
    if not policies:
        raise KVCacheError("--kv-policy needs at least one policy.")
    return policies


# ----------------------------------------------------------------------------------------
# workload
# ----------------------------------------------------------------------------------------

def lognormal_lengths(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[int]:
    """n long-tailed lengths in [lo, hi]: lognormal with its median 40% of the way from lo
    to hi on a log scale, sigma 0.3 * ln(hi / lo), clipped."""
    if lo == hi:
        return [lo] * n
    span = math.log(hi / lo)
    x = rng.lognormal(mean=math.log(lo) + 0.4 * span, sigma=0.3 * span, size=n)
    return [int(v) for v in np.clip(np.rint(x), lo, hi)]


@dataclass
class Workload:
    prompts: list[list[int]]
    outputs: list[int]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def prompt_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]

    def head(self, n: int) -> "Workload":
        return Workload(self.prompts[:n], self.outputs[:n])

    def summary(self) -> dict:
        def stats(xs):
            return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "mean": statistics.fmean(xs),
                    "total": sum(xs)}
        return {"num_requests": len(self), "prompt_len": stats(self.prompt_lens), "output_len": stats(self.outputs),
                "total_len_mean": statistics.fmean(p + o for p, o in zip(self.prompt_lens, self.outputs))}


def make_workload(corpus: list[int], n: int, seed: int, pmin: int, pmax: int, omin: int, omax: int) -> Workload:
    """Seeded prompts (corpus slices laid out one after another with random gaps, so they
    neither overlap nor share a prefix while the corpus lasts) and output lengths."""
    rng = np.random.default_rng(seed)
    plens = lognormal_lengths(rng, n, pmin, pmax)
    olens = lognormal_lengths(rng, n, omin, omax)
    if pmax > len(corpus):
        raise SystemExit(f"The prompt text has only {len(corpus)} tokens; --max-prompt {pmax} is too long.")
    slack = max(0, (len(corpus) - sum(plens)) // n)
    prompts, cursor = [], int(rng.integers(0, slack + 1))
    for length in plens:
        if cursor + length > len(corpus):  # more prompt tokens than text: wrap (slices may then overlap)
            cursor = int(rng.integers(0, len(corpus) - length + 1))
        prompts.append(corpus[cursor:cursor + length])
        cursor += length + int(rng.integers(0, slack + 1))
    order = rng.permutation(n)  # long and short prompts from anywhere in the text, in random order
    return Workload([prompts[i] for i in order], olens)


# ----------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------

@dataclass
class RunResult:
    name: str
    requests: int
    of_requests: int  # requests in the whole workload (requests < of_requests: a subset)
    prompt_tokens: int
    generated_tokens: int
    wall_s: float  # the median of walls_s
    note: str = ""
    walls_s: tuple[float, ...] = ()  # every repeat's wall time, in run order

    @classmethod
    def median_of(cls, runs: list["RunResult"]) -> "RunResult":
        """One result for repeats of the same run: the median wall time, every wall kept."""
        walls = tuple(r.wall_s for r in runs)
        first = runs[0]
        return cls(first.name, first.requests, first.of_requests, first.prompt_tokens, first.generated_tokens,
                   statistics.median(walls), first.note, walls)

    @property
    def spread(self) -> str:
        """'median of N (min-max s)' where repeated, else ''."""
        if len(self.walls_s) < 2:
            return ""
        return f"median of {len(self.walls_s)}: {min(self.walls_s):.1f}-{max(self.walls_s):.1f} s"

    @property
    def subset(self) -> bool:
        return self.requests < self.of_requests

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.generated_tokens) / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def gen_tok_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"name": self.name, "requests": self.requests, "of_requests": self.of_requests,
                "subset": self.subset, "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens, "wall_s": self.wall_s,
                "total_tok_s": self.total_tok_s, "gen_tok_s": self.gen_tok_s, "note": self.note,
                "walls_s": list(self.walls_s or (self.wall_s,))}


def _ratio(a: float, b: float) -> float:
    if b == 0:
        return float("inf") if a > 0 else float("nan")
    return a / b


# ----------------------------------------------------------------------------------------
# ours
# ----------------------------------------------------------------------------------------

def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def make_llm(args, variant: str, prefix_caching: bool = True) -> LLM:
    """The engine of one `variants` label."""
    policy, quantization = args.variants[variant]
    return LLM(args.model, dtype=args.dtype, threads=args.threads, progress=False,
               kv_cache_memory=args.kv_budget_bytes, block_size=args.block_size,
               enable_prefix_caching=prefix_caching, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, kernels=args.kernels, kv_policy=policy,
               quantization=quantization)


def warm_up(llm: LLM, corpus: list[int]) -> None:
    """One small untimed request (first-call overheads), then forget its cached blocks."""
    llm.generate([corpus[-40:]], greedy(4))
    llm.engine.kv.reset_prefix_cache()


def check_outputs(outs, wl: Workload, who: str) -> None:
    for i, (o, n) in enumerate(zip(outs, wl.outputs)):
        if o.error or len(o.token_ids) != n:
            raise RuntimeError(f"{who}: request {i} generated {len(o.token_ids)} tokens, expected {n} "
                               f"({o.error or o.finish_reason})")


def run_ours_batched(llm: LLM, wl: Workload, progress: Progress) -> RunResult:
    task = progress.add_task(f"2a ours, {len(wl)} requests at once", total=None)
    llm.engine.kv.reset_prefix_cache()
    pre0 = llm.engine.scheduler.num_preemptions
    t0 = time.perf_counter()
    outs = llm.generate(wl.prompts, [greedy(n) for n in wl.outputs])
    wall = time.perf_counter() - t0
    check_outputs(outs, wl, "ours (batched)")
    progress.update(task, total=1, completed=1)
    preempt = llm.engine.scheduler.num_preemptions - pre0
    return RunResult("ours, continuous batching", len(wl), len(wl), sum(wl.prompt_lens), sum(wl.outputs), wall,
                     f"{preempt} preemptions")


def run_ours_one_by_one(llm: LLM, wl: Workload, of: int, progress: Progress) -> RunResult:
    task = progress.add_task(f"2b ours, one by one ({len(wl)} requests)", total=len(wl))
    llm.engine.kv.reset_prefix_cache()
    t0 = time.perf_counter()
    for p, n in zip(wl.prompts, wl.outputs):
        out = llm.generate([p], [greedy(n)])
        check_outputs(out, Workload([p], [n]), "ours (one by one)")
        progress.advance(task)
    wall = time.perf_counter() - t0
    return RunResult("ours, one by one", len(wl), of, sum(wl.prompt_lens), sum(wl.outputs), wall)


@dataclass
class StepRecord:
    t: float  # seconds since the run started, at the end of the step
    generated: int  # tokens generated so far in this run
    blocks_used: int
    tokens_held: int  # tokens whose K/V the used blocks hold (a shared block counted once)
    tokens_held_sum: int  # sum of num_computed_tokens over running requests
    running: int
    waiting: int


def run_capacity(llm: LLM, wl: Workload, output_cap: int, progress: Progress) -> tuple[dict, list[StepRecord]]:
    """All requests through run_to_completion, probing the pool after every step.

    As a chat client would, every request carries `max_tokens=output_cap`, not its length;
    the probe ends each one when it has generated its workload length, as if the model had
    emitted EOS there (aborted before the next step is scheduled, its blocks freed at once).
    The scheduler never learns a request's length before it ends."""
    engine = llm.engine
    kv, sched, bs = engine.kv, engine.scheduler, engine.config.block_size
    kv.reset_prefix_cache()
    task = progress.add_task(f"3 capacity in {format_bytes(engine.storage.nbytes)}", total=sum(wl.outputs))
    records: list[StepRecord] = []
    gen0, pre0 = engine.tokens_generated, sched.num_preemptions

    def probe(_outputs) -> None:
        for r in list(sched.running):  # the workload's EOS: the request reached its length
            if len(r.output_token_ids) >= length_of[r.request_id]:
                engine.abort(r.request_id)
        held: dict[int, int] = {}
        if engine.config.row_policy is not None:  # per-request caches: the bytes they hold, in tokens at the rate
            held[0] = engine.stats()["kv_bytes_held"] // engine.storage.bytes_per_token
        for r in sched.running if engine.config.row_policy is None else ():
            n = kv.num_slots(r.request_id, r.num_computed_tokens) if r.request_id in kv else 0  # evicted: no slot
            for i, b in enumerate(kv.block_table(r.request_id) if r.request_id in kv else []):
                k = min(bs, n - i * bs)
                if k <= 0:
                    break
                if b != RELEASED and k > held.get(b, 0):  # a window gave this block back
                    held[b] = k
        gen = engine.tokens_generated - gen0
        records.append(StepRecord(time.perf_counter() - t0, gen, kv.usage()["blocks_used"], sum(held.values()),
                                  sum(r.num_computed_tokens - r.num_evicted_tokens for r in sched.running),
                                  len(sched.running),
                                  len(sched.waiting)))
        progress.update(task, completed=gen)

    t0 = time.perf_counter()
    reqs = [engine.add_request(p, greedy(max(output_cap, n)), eos_ids=llm.eos_ids)
            for p, n in zip(wl.prompts, wl.outputs)]
    length_of = {r.request_id: n for r, n in zip(reqs, wl.outputs)}
    engine.run_to_completion(reqs, on_step=probe)
    wall = time.perf_counter() - t0
    check_outputs([r.to_output() for r in reqs], wl, "ours (capacity run)")

    num_blocks = engine.config.num_blocks
    bpt = engine.storage.bytes_per_token
    # time-weighted over steps with blocks in use: each record stands for its step's duration
    w_sum = waste_sum = run_sum = 0.0
    prev = 0.0
    for rec in records:
        dt, prev = rec.t - prev, rec.t
        if rec.blocks_used:
            waste = 1.0 - rec.tokens_held / (rec.blocks_used * bs)
            w_sum += dt
            waste_sum += dt * waste
            run_sum += dt * rec.running
    peak = max(records, key=lambda r: r.running) if records else None
    return {
        "wall_s": wall,
        "total_tok_s": (sum(wl.prompt_lens) + sum(wl.outputs)) / wall,
        "gen_tok_s": sum(wl.outputs) / wall,
        "steps": len(records),
        "num_blocks": num_blocks,
        "block_size": bs,
        "pool_tokens": num_blocks * bs,
        "pool_bytes": engine.storage.nbytes,
        "bytes_per_token": bpt,
        "peak_running": peak.running if peak else 0,
        "peak_running_at_s": peak.t if peak else 0.0,
        "mean_running": run_sum / w_sum if w_sum else 0.0,
        "peak_blocks_used": max((r.blocks_used for r in records), default=0),
        "waste_fraction": waste_sum / w_sum if w_sum else 0.0,
        "waste_fraction_max": max((1 - r.tokens_held / (r.blocks_used * bs) for r in records if r.blocks_used),
                                  default=0.0),
        "preemptions": sched.num_preemptions - pre0,
        "preempted_requests": sum(1 for r in reqs if r.preemptions),
    }, records


# ----------------------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------------------

def run_hf(llm: LLM, wl: Workload, of: int, args, progress: Progress) -> RunResult:
    from transformers import AutoModelForCausalLM

    dt = parse_dtype(args.dtype)
    hf_dir = resolve_model_dir(args.model, progress=False)  # float weights, whatever our runs hold
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dt).eval()
    pad = llm.tokenizer.pad_token_id
    if pad is None:
        pad = llm.config.eos_token_ids[0] if llm.config.eos_token_ids else 0
    bsz = args.hf_batch_size
    batches = [list(range(i, min(i + bsz, len(wl)))) for i in range(0, len(wl), bsz)]
    task = progress.add_task(f"2c transformers, batches of {bsz} ({len(wl)} requests)", total=len(batches))

    def generate(rows: list[list[int]], max_new: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        with torch.inference_mode():
            seq = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                              do_sample=False, pad_token_id=pad)
        if seq.shape[1] - width != max_new:
            raise RuntimeError(f"transformers generated {seq.shape[1] - width} tokens, expected {max_new}")
        return seq

    generate([wl.prompts[0][:8], wl.prompts[-1][:5]], 2)  # warm-up, untimed
    t0 = time.perf_counter()
    for b in batches:
        generate([wl.prompts[i] for i in b], max(wl.outputs[i] for i in b))
        progress.advance(task)
    wall = time.perf_counter() - t0
    return RunResult(f"transformers, padded batches of {bsz}", len(wl), of, sum(wl.prompt_lens), sum(wl.outputs),
                     wall, "useful tokens only (no padding, no tokens past a request's own length)")


class LlamaCppFailed(RuntimeError):
    """llama.cpp's child process died or raised: 2d is reported as skipped with the reason."""


def _llamacpp_walls(prompts: list[list[int]], outputs: list[int], model_name: str, threads: int, repeats: int,
                    tick) -> tuple[str, list[float]]:
    """2d's timed loop (in the child): every request once per repeat; (GGUF name, walls)."""
    import llama_cpp  # ImportError: reported as skipped

    from kvcache.models.loader import packaged_gguf

    gguf = packaged_gguf(model_name) if model_name == DEFAULT_MODEL else Path(model_name)
    if gguf.suffix != ".gguf" or not gguf.is_file():
        raise FileNotFoundError(f"no GGUF file for model {model_name}")
    n_ctx = max(2048, max(len(p) + o for p, o in zip(prompts, outputs)) + 1)
    model = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads,
                            n_ctx=n_ctx, logits_all=False, verbose=False)

    def generate(ids: list[int], n: int) -> int:
        # Llama.generate never stops on EOS by itself: stop after exactly n tokens.
        # reset() first so llama.cpp reuses no KV of the previous request.
        model.reset()
        count = 0
        for _ in model.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            count += 1
            if count >= n:
                break
        return count

    walls = []
    for _ in range(repeats):
        generate(prompts[-1][:8], 2)  # warm-up, untimed
        t0 = time.perf_counter()
        for p, n in zip(prompts, outputs):
            got = generate(p, n)
            if got != n:
                raise RuntimeError(f"llama.cpp generated {got} tokens, expected {n}")
            tick()
        walls.append(time.perf_counter() - t0)
    return gguf.name, walls


def _llamacpp_child(conn, prompts, outputs, model_name, threads, repeats) -> None:
    torch.set_num_threads(1)  # nothing of torch runs here; keep its pool off llama.cpp's cores
    try:
        conn.send(("done", _llamacpp_walls(prompts, outputs, model_name, threads, repeats,
                                           lambda: conn.send(("tick", None)))))
    except ImportError:
        conn.send(("skip", "llama-cpp-python not installed"))
    except FileNotFoundError as exc:
        conn.send(("skip", str(exc)))
    except Exception as exc:  # noqa: BLE001 - any failure of the baseline is reported, not raised
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def run_llamacpp(wl: Workload, of: int, args, progress: Progress) -> RunResult:
    """2d in a spawned child process, so that a crash in llama.cpp's native code (seen: its AMX
    kernels on a VM that refuses tile instructions) costs only this baseline, not the run."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_llamacpp_child, daemon=True,
                       args=(send, wl.prompts, wl.outputs, args.model, args.threads, args.repeats))
    proc.start()
    send.close()
    task = progress.add_task(f"2d llama.cpp, one by one ({len(wl)} requests)", total=len(wl) * args.repeats)
    result = None
    while result is None:
        try:
            kind, value = recv.recv()
        except EOFError:  # the child died without a word
            break
        if kind == "tick":
            progress.advance(task)
        else:
            result = (kind, value)
    proc.join()
    if result is None:
        code = proc.exitcode
        why = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        raise LlamaCppFailed(f"llama.cpp's process died ({why}); its native code crashed")
    kind, value = result
    if kind == "skip":
        raise LlamaCppFailed(value)
    if kind == "error":
        raise LlamaCppFailed(f"llama.cpp failed: {value}")
    name, walls = value
    runs = [RunResult(f"llama.cpp ({name}), one by one", len(wl), of, sum(wl.prompt_lens), sum(wl.outputs),
                      w, "quantized GGUF weights, greedy") for w in walls]
    return RunResult.median_of(runs)


# ----------------------------------------------------------------------------------------
# prefix caching
# ----------------------------------------------------------------------------------------

def prefix_workload(tokenizer, corpus: list[int], args) -> list[list[int]]:
    """A shared system prompt (the first --prefix-tokens of the text) + a distinct question each."""
    system = corpus[:args.prefix_tokens]
    if len(system) < args.prefix_tokens:
        raise SystemExit(f"The prompt text has only {len(corpus)} tokens; --prefix-tokens is too long.")
    prompts = []
    region = len(corpus) // 2  # questions come from the second half: never part of the system prompt
    step = max(args.question_tokens, (len(corpus) - region - args.question_tokens) // max(1, args.prefix_requests))
    for i in range(args.prefix_requests):
        head = list(tokenizer(f"\n\nUser question {i + 1}: ", add_special_tokens=False)["input_ids"])
        k = max(1, args.question_tokens - len(head))
        start = region + i * step
        prompts.append(system + head + corpus[start:start + k])
    return prompts


def run_prefix(args, policy: str, corpus: list[int], caching: bool, progress: Progress) -> dict:
    label = "on" if caching else "off"
    task = progress.add_task(f"4 prefix caching {label}: {args.prefix_requests} requests ({policy})", total=None)
    llm = make_llm(args, policy, prefix_caching=caching)
    prompts = prefix_workload(llm.tokenizer, corpus, args)
    warm_up(llm, corpus)
    u0 = llm.engine.kv.usage()
    pre0 = llm.engine.scheduler.num_preemptions
    t0 = time.perf_counter()
    outs = llm.generate(prompts, greedy(args.prefix_max_tokens))
    wall = time.perf_counter() - t0
    u1 = llm.engine.kv.usage()
    for o in outs:
        if o.error or len(o.token_ids) != args.prefix_max_tokens:
            raise RuntimeError(f"prefix test ({label}): {o.error or 'wrong output length'}")
    ttft = [o.metrics.ttft_s for o in outs]
    queries = u1["prefix_queries"] - u0["prefix_queries"]
    hits = u1["prefix_hits"] - u0["prefix_hits"]
    progress.update(task, total=1, completed=1)
    res = {
        "prefix_caching": caching,
        "requests": len(prompts),
        "prompt_tokens_mean": statistics.fmean(len(p) for p in prompts),
        "ttft_mean_s": statistics.fmean(ttft),
        "ttft_median_s": statistics.median(ttft),
        "ttft_max_s": max(ttft),
        "ttft_s": ttft,  # every request's, in submission order
        "wall_s": wall,
        "prefix_hit_rate": hits / queries if queries else 0.0,
        "prefix_hit_rate_engine": llm.stats()["prefix_hit_rate"],  # since the engine started (warm-up included)
        "cached_prompt_tokens_mean": statistics.fmean(o.metrics.cached_prompt_tokens for o in outs),
        "preemptions": llm.engine.scheduler.num_preemptions - pre0,
    }
    del llm
    gc.collect()
    return res


# ----------------------------------------------------------------------------------------
# plot
# ----------------------------------------------------------------------------------------

def write_plot(path: str, records: list[StepRecord], cap: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return
    records = [StepRecord(0.0, 0, 0, 0, 0, 0, 0)] + records  # the empty pool at the start
    t = [r.t for r in records]
    gens = [r.generated for r in records]
    dts = [b - a for a, b in zip(t[:-1], t[1:])]
    window = max(t[-1] / 40, 3 * statistics.median(dts))
    rate = []
    for i, ti in enumerate(t):  # tokens generated in the last `window` seconds (from a step boundary)
        k = min(max(bisect.bisect_right(t, ti - window) - 1, 0), max(i - 1, 0))  # last boundary <= ti - window
        rate.append((gens[i] - gens[k]) / (ti - t[k]) if ti > t[k] else 0.0)
    bpt, bs = cap["bytes_per_token"], cap["block_size"]
    mib = 2 ** 20
    used = [r.blocks_used * bs * bpt / mib for r in records]
    held = [r.tokens_held * bpt / mib for r in records]

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    ax1.plot(t, rate, color="tab:blue")
    ax1.set_ylabel(f"generated tok/s\n(rolling {window:.2f} s)")
    ax1.grid(alpha=0.3)
    ax1.set_title(title)
    ax2.step(t, used, where="pre", color="tab:orange", label="KV allocated (blocks used)")
    ax2.step(t, held, where="pre", color="tab:green", label="KV holding tokens")
    ax2.axhline(cap["pool_bytes"] / mib, color="gray", ls="--", lw=1, label="KV pool")
    ax2.set_ylabel("KV memory (MiB)")
    ax2.set_xlabel("time (s)")
    ax2.grid(alpha=0.3)
    twin = ax2.twinx()
    twin.step(t, [r.running for r in records], where="pre", color="tab:purple", alpha=0.6, label="requests running")
    twin.set_ylabel("requests running")
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------

def _mark(passed: bool | None) -> str:
    if passed is None:
        return "[dim]n/a[/dim]"
    return "[green]pass[/green]" if passed else "[red]FAIL[/red]"


def _x(r: float) -> str:
    return "∞" if r == float("inf") else ("n/a" if math.isnan(r) else f"{r:.2f}x")


def prompts_fill(prompt_lens: list[int], pool_tokens: int) -> int:
    """The most requests, taken in arrival order, whose prompts fit `pool_tokens` together."""
    total = 0
    for i, n in enumerate(prompt_lens):
        total += n
        if total > pool_tokens:
            return i
    return len(prompt_lens)


def build_report(args, policy: str, wl: Workload, runs: dict, cap: dict | None, static: dict | None,
                 prefix: dict | None, skipped: dict) -> tuple[Table, dict, list[dict]]:
    t = Table(box=box.SIMPLE_HEAD, title=(
        f"Throughput: {args.model}, {args.dtype}, KV policy {policy}, kernels {args.kernels}, {args.threads} threads, "
        f"KV budget {format_bytes(args.kv_budget_bytes)}, {len(wl)} requests (seed {args.seed})"))
    for col in ("", "figure", "value", "goal", ""):
        t.add_column(col, justify="right" if col == "value" else "left", no_wrap=col != "figure")
    goals: list[dict] = []

    def row(section, figure, value, goal="", passed=None, key=None, measured=None, target=None):
        t.add_row(section, figure, value, goal, _mark(passed) if goal else "")
        if key:
            goals.append({"goal": key, "value": measured, "target": target, "passed": passed,
                          "infinite": measured == float("inf")})

    s = wl.summary()
    pl, ol = s["prompt_len"], s["output_len"]
    row("workload", "prompt tokens min / median / max", f"{pl['min']} / {pl['median']:g} / {pl['max']}")
    row("", "output tokens min / median / max", f"{ol['min']} / {ol['median']:g} / {ol['max']}")
    row("", "tokens in all (prompt + output)", f"{pl['total']:,} + {ol['total']:,}")
    t.add_section()

    a = runs["ours_batched"]
    row("throughput", "2a ours, all at once: tok/s (gen tok/s)", f"{a.total_tok_s:,.0f} ({a.gen_tok_s:,.0f})")
    row("", "   wall time", f"{a.wall_s:.1f} s  [dim]{a.note}[/dim]" + (f"  [dim]({a.spread})[/dim]" if a.spread else ""))
    for key, label, short, goal_x in (
            ("ours_one_by_one", "2b ours, one by one", "2b", GOAL_VS_ONE_BY_ONE),
            ("hf", f"2c transformers, batches of {args.hf_batch_size}", "2c", GOAL_VS_HF),
            ("llamacpp", "2d llama.cpp, one by one", "2d", GOAL_VS_LLAMACPP)):
        r = runs.get(key)
        if r is None:
            row("", f"{label}: tok/s", f"[dim]skipped: {skipped.get(key, 'skipped')}[/dim]",
                f"2a >= {goal_x:g}x", None, f"ours_vs_{key.removeprefix('ours_')}", None, goal_x)
            continue
        sub = f" [yellow]\\[first {r.requests}/{r.of_requests} requests][/yellow]" if r.subset else ""
        row("", f"{label}: tok/s (gen tok/s){sub}", f"{r.total_tok_s:,.0f} ({r.gen_tok_s:,.0f})"
            + (f"  [dim]({r.spread})[/dim]" if r.spread else ""))
        speed = _ratio(a.total_tok_s, r.total_tok_s)
        row("", f"   2a / {short} (total tok/s)", _x(speed),
            f">= {goal_x:g}x", speed >= goal_x, f"ours_vs_{key.removeprefix('ours_')}", speed, goal_x)
    t.add_section()

    if cap is not None:
        row("capacity", f"KV pool: {cap['num_blocks']} blocks x {cap['block_size']} tokens",
            f"{cap['pool_tokens']:,} tokens, {format_bytes(cap['pool_bytes'])}")
        row("", "bytes per token", f"{cap['bytes_per_token']:,}")
        row("", "peak requests resident at once (mean)", f"{cap['peak_running']} ({cap['mean_running']:.1f})")
        r1 = _ratio(cap["peak_running"], static["max_len_requests"])
        row("", f"   if each reserved max_model_len ({static['max_model_len']:,})",
            f"{static['max_len_requests']}  → {_x(r1)}", f">= {GOAL_VS_MAX_LEN_RESERVE:g}x",
            r1 >= GOAL_VS_MAX_LEN_RESERVE, "capacity_vs_max_len_reserve", r1, GOAL_VS_MAX_LEN_RESERVE)
        r2 = _ratio(cap["peak_running"], static["full_reserve_requests"])
        row("", f"   if each reserved prompt + max_tokens ({static['max_tokens']}; mean "
                f"{static['mean_reserved_len']:.0f})",
            f"{static['full_reserve_requests']}  → {_x(r2)}", f">= {GOAL_VS_FULL_RESERVE:g}x",
            r2 >= GOAL_VS_FULL_RESERVE, "capacity_vs_full_reserve", r2, GOAL_VS_FULL_RESERVE)
        r3 = _ratio(cap["peak_running"], static["oracle_reserve_requests"])
        row("", f"   if each reserved prompt + its exact output (an oracle; mean "
                f"{static['mean_total_len']:.0f})", f"{static['oracle_reserve_requests']}  → {_x(r3)}")
        row("", "   requests whose prompts alone fill the pool, in arrival order",
            f"{static['prompts_fill_pool_at']}")
        row("", "allocated KV not holding a token (time-weighted)", f"{cap['waste_fraction']:.2%}",
            f"< {GOAL_WASTE:.0%}", cap["waste_fraction"] < GOAL_WASTE, "kv_waste", cap["waste_fraction"], GOAL_WASTE)
        row("", "   worst step", f"{cap['waste_fraction_max']:.2%}")
        row("", "preemptions (requests preempted)", f"{cap['preemptions']} ({cap['preempted_requests']})")
        row("", "run: tok/s (gen tok/s), wall, steps",
            f"{cap['total_tok_s']:,.0f} ({cap['gen_tok_s']:,.0f}), {cap['wall_s']:.1f} s, {cap['steps']}")
    else:
        row("capacity", "[dim]skipped[/dim]", "")
    t.add_section()

    if prefix is not None:
        on, off = prefix["on"], prefix["off"]
        row("prefix", f"{on['requests']} requests, {args.prefix_tokens}-token shared prefix, "
                      f"~{args.question_tokens}-token questions, {args.prefix_max_tokens} new", "")
        row("", "TTFT mean / median, caching on",
            f"{on['ttft_mean_s'] * 1e3:,.0f} / {on['ttft_median_s'] * 1e3:,.0f} ms")
        row("", "TTFT mean / median, caching off",
            f"{off['ttft_mean_s'] * 1e3:,.0f} / {off['ttft_median_s'] * 1e3:,.0f} ms")
        row("", "TTFT off / on (mean)", _x(prefix["ttft_mean_ratio"]), f">= {GOAL_PREFIX_TTFT:g}x",
            prefix["ttft_mean_ratio"] >= GOAL_PREFIX_TTFT, "prefix_ttft", prefix["ttft_mean_ratio"], GOAL_PREFIX_TTFT)
        row("", "TTFT off / on (median)", _x(prefix["ttft_median_ratio"]))
        row("", "prefix hit rate (of prompt tokens looked up)", f"{on['prefix_hit_rate']:.1%}")
        row("", "mean cached prompt tokens per request",
            f"{on['cached_prompt_tokens_mean']:.0f} of {on['prompt_tokens_mean']:.0f}")
        row("", "wall time on / off", f"{on['wall_s']:.1f} s / {off['wall_s']:.1f} s")
    else:
        row("prefix", "[dim]skipped[/dim]", "")
    return t, s, goals


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------

def static_reservations(args, llm: LLM, wl: Workload, cap: dict, err) -> dict:
    """What a static allocator with the same budget and bytes/token would hold: requests that fit
    reserving max_model_len, prompt + max_tokens (the cap), or an oracle's exact lengths."""
    shape = ModelShape.from_hf_config(read_hf_config(llm.model_dir), name=args.model)
    bpt = kv_bytes_per_token(shape, KVFormat.parse(_DTYPE_NAMES.get(parse_dtype(args.dtype), args.dtype)))
    if quant_format(llm.kv_policy, llm.config.head_dim) is not None:  # reservations in the same format
        bpt = llm.engine_bytes_per_token
    if bpt != cap["bytes_per_token"]:
        err.print(f"[yellow]note: spec bytes/token {bpt} != engine bytes/token {cap['bytes_per_token']}[/yellow]")
    s = wl.summary()
    mean_total = s["total_len_mean"]
    reserved = s["prompt_len"]["mean"] + args.max_output  # prompt + max_tokens, at the mean prompt
    static = {
        "budget_bytes": args.kv_budget_bytes,
        "bytes_per_token": bpt,
        "max_model_len": llm.max_model_len,
        "max_len_requests": args.kv_budget_bytes // (llm.max_model_len * bpt),
        "max_len_requests_fractional": args.kv_budget_bytes / (llm.max_model_len * bpt),
        # what each request asks for (max_tokens, the cap): what a static allocator reserves
        "max_tokens": args.max_output,
        "mean_reserved_len": reserved,
        "full_reserve_requests": int(args.kv_budget_bytes // (reserved * bpt)),
        # an allocator told every answer's length in advance (no server is)
        "mean_total_len": mean_total,
        "oracle_reserve_requests": int(args.kv_budget_bytes // (mean_total * bpt)),
        # arrival order: how many requests' prompts alone fill the pool (FCFS admits them in turn)
        "prompts_fill_pool_at": prompts_fill(wl.prompt_lens, cap["pool_tokens"]),
    }
    static["ours_vs_max_len_reserve"] = _ratio(cap["peak_running"], static["max_len_requests"])
    static["ours_vs_full_reserve"] = _ratio(cap["peak_running"], static["full_reserve_requests"])
    static["ours_vs_oracle_reserve"] = _ratio(cap["peak_running"], static["oracle_reserve_requests"])
    return static


def plot_path(path: str, policy: str, several: bool) -> str:
    """`--plot` as given for one policy; with several, one file each: the policy in its name."""
    if not several:
        return path
    p = Path(path)
    slug = "".join(c if c.isalnum() else "-" for c in policy).strip("-")
    return str(p.with_name(f"{p.stem}.{slug}{p.suffix}"))


def comparison_table(args, wl: Workload, results: list[dict]) -> Table:
    """One line per policy, all measured in this run: the figures policies are compared by."""
    t = Table(box=box.SIMPLE_HEAD, title=f"Policies compared in one run: {args.model}, {args.dtype}, "
              f"{args.threads} threads, KV budget {format_bytes(args.kv_budget_bytes)}, {len(wl)} requests")
    for col in ("policy", "2a tok/s", "2b tok/s", "2a / 2b", "bytes/token", "peak resident", "preemptions",
                "prefix TTFT off/on"):
        t.add_column(col, justify="left" if col == "policy" else "right", no_wrap=True)
    for r in results:
        a, b = r["throughput"]["ours_batched"], r["throughput"].get("ours_one_by_one")
        cap, pre = r["capacity"], r["prefix_caching"]
        t.add_row(r["variant"], f"{a['total_tok_s']:,.0f}", f"{b['total_tok_s']:,.0f}" if b else "-",
                  _x(r["speedups"]["ours_vs_one_by_one"]) if b else "-",
                  f"{cap['bytes_per_token']:,}" if cap else "-", str(cap["peak_running"]) if cap else "-",
                  str(cap["preemptions"]) if cap else "-", _x(pre["ttft_mean_ratio"]) if pre else "-")
    return t


def record_timings(results: list[dict], baselines: dict) -> tuple[dict, dict]:
    """(ours, the baselines'): every raw wall time and TTFT of the run, per policy for ours."""
    ours = {}
    for r in results:
        t = {f"{k}_walls_s": v["walls_s"] for k, v in r["throughput"].items()}
        if r["capacity"]:
            t["capacity_wall_s"] = [r["capacity"]["wall_s"]]
        if r["prefix_caching"]:
            t["prefix_on_ttft_s"] = r["prefix_caching"]["on"]["ttft_s"]
            t["prefix_off_ttft_s"] = r["prefix_caching"]["off"]["ttft_s"]
        ours[r["variant"]] = t
    return ours, {f"{k}_walls_s": v["walls_s"] for k, v in baselines.items()}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_transformers()
    console, err = consoles(args.json)
    policies = args.kv_policies

    alone_runs: dict[str, list[RunResult]] = {p: [] for p in policies}
    batched_runs: dict[str, list[RunResult]] = {p: [] for p in policies}
    baselines: dict[str, RunResult] = {}
    skipped: dict[str, str] = {}
    caps: dict[str, tuple[dict, dict, list[StepRecord]]] = {}
    prefixes: dict[str, dict] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=False) as progress:
        load = progress.add_task("loading the model" + (f" ({len(policies)} policies)" if len(policies) > 1 else ""),
                                 total=len(policies))
        llms = {}
        for policy in policies:  # all loaded before any timing, so the runs can interleave
            llms[policy] = make_llm(args, policy)
            progress.advance(load)
        first = llms[policies[0]]
        corpus = corpus_ids(first.tokenizer)
        wl = make_workload(corpus, args.num_requests, args.seed, args.min_prompt, args.max_prompt,
                           args.min_output, args.max_output)
        longest = max(p + o for p, o in zip(wl.prompt_lens, wl.outputs))
        if longest > first.max_model_len:
            raise SystemExit(f"A request needs {longest} tokens, more than max_model_len {first.max_model_len}.")
        s = wl.summary()
        m = machine_info()
        err.print(f"machine: {m['cpu']}, {m['cores']} cores, "
                  f"{'AVX-512' if m['avx512f'] else 'AVX2' if m['avx2'] else 'no AVX2'}"
                  f"{' with bf16' if m['avx512_bf16'] else ''}{', AMX' if m['amx'] else ''}")
        err.print(f"workload: {len(wl)} requests; prompt tokens min/median/max "
                  f"{s['prompt_len']['min']}/{s['prompt_len']['median']:g}/{s['prompt_len']['max']}; "
                  f"output tokens {s['output_len']['min']}/{s['output_len']['median']:g}/{s['output_len']['max']}")
        n_base = min(args.max_requests_baseline or len(wl), len(wl))
        base = wl.head(n_base)

        for llm in llms.values():
            warm_up(llm, corpus)
        for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine hits every run
            for policy in policies:
                batched_runs[policy].append(run_ours_batched(llms[policy], wl, progress))
                if not args.skip_one_by_one:
                    alone_runs[policy].append(run_ours_one_by_one(llms[policy], base, len(wl), progress))
        if args.skip_one_by_one:
            skipped["ours_one_by_one"] = "--skip-one-by-one"

        if args.skip_capacity:
            skipped["capacity"] = "--skip-capacity"
        else:
            for policy in policies:
                cap, steps = run_capacity(llms[policy], wl, args.max_output, progress)
                caps[policy] = (cap, static_reservations(args, llms[policy], wl, cap, err), steps)

        if args.skip_hf:
            skipped["hf"] = "--skip-hf"
        else:
            baselines["hf"] = RunResult.median_of([run_hf(first, base, len(wl), args, progress)
                                                   for _ in range(args.repeats)])
            gc.collect()  # the transformers model

        if args.skip_llamacpp:
            skipped["llamacpp"] = "--skip-llamacpp"
        else:
            try:
                baselines["llamacpp"] = run_llamacpp(base, len(wl), args, progress)
            except LlamaCppFailed as exc:
                err.print(f"skipped llama.cpp: {exc}")
                skipped["llamacpp"] = str(exc)
        model_dir = str(first.model_dir)
        del llms, first
        gc.collect()

        if args.skip_prefix:
            skipped["prefix"] = "--skip-prefix"
        else:
            for policy in policies:
                on = run_prefix(args, policy, corpus, True, progress)
                off = run_prefix(args, policy, corpus, False, progress)
                prefixes[policy] = {"on": on, "off": off,
                                    "ttft_mean_ratio": _ratio(off["ttft_mean_s"], on["ttft_mean_s"]),
                                    "ttft_median_ratio": _ratio(off["ttft_median_s"], on["ttft_median_s"]),
                                    "wall_ratio": _ratio(off["wall_s"], on["wall_s"])}

    results = []
    for policy in policies:
        runs = {"ours_batched": RunResult.median_of(batched_runs[policy])}
        if alone_runs[policy]:
            runs["ours_one_by_one"] = RunResult.median_of(alone_runs[policy])
        cap, static, steps = caps.get(policy, (None, None, []))
        prefix = prefixes.get(policy)
        table, summary, goals = build_report(args, policy, wl, {**runs, **baselines}, cap, static, prefix, skipped)
        console.print(table)
        if args.plot:
            if steps:
                path = plot_path(args.plot, policy, len(policies) > 1)
                write_plot(path, steps, cap, f"{args.model}, {policy}: {len(wl)} requests in "
                           f"{format_bytes(cap['pool_bytes'])} of KV ({args.dtype}, {args.threads} threads)")
                err.print(f"plot written to {path}")
            else:
                err.print("[yellow]no plot: the capacity run was skipped[/yellow]")
        a = runs["ours_batched"]
        results.append({
            "kv_policy": args.variants[policy][0],
            "variant": policy,
            "quantization": args.variants[policy][1],
            "throughput": {k: r.to_dict() for k, r in runs.items()},
            "speedups": {f"ours_vs_{k.removeprefix('ours_')}": _ratio(a.total_tok_s, r.total_tok_s)
                         for k, r in {**runs, **baselines}.items() if k != "ours_batched"},
            "capacity": None if cap is None else {**cap, "static": static},
            "prefix_caching": prefix,
            "goals": goals,
        })
    if len(policies) > 1:
        console.print(comparison_table(args, wl, results))

    result = {
        "config": {"model": args.model, "model_dir": model_dir, "dtype": args.dtype, "threads": args.threads,
                   "seed": args.seed, "kv_budget": args.kv_budget, "kv_budget_bytes": args.kv_budget_bytes,
                   "block_size": args.block_size, "max_num_seqs": args.max_num_seqs,
                   "max_num_batched_tokens": args.max_num_batched_tokens, "hf_batch_size": args.hf_batch_size,
                   "max_requests_baseline": args.max_requests_baseline, "repeats": args.repeats,
                   "kv_policies": policies},
        "machine": machine_info(),
        "workload": summary,
        "baselines": {k: r.to_dict() for k, r in baselines.items()},
        "skipped": skipped,
        "policies": results,
    }
    result = record.json_safe(result)
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        sys.stdout.flush()
    ours, theirs = record_timings(result["policies"], result["baselines"])
    record.save("bench_throughput", "python benchmarks/bench_throughput.py", argv, args.record_folder,
                threads=args.threads, config=result["config"], machine=result["machine"], timings=ours,
                baseline_timings=theirs, results=result)
    return result


if __name__ == "__main__":
    run_main(main)
