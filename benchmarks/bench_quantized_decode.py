"""Batch-1 decode and prefill speed per weight quantization, each run in a fresh process.

Workload: the default model (or `--model`), a `--prompt-tokens` prompt of real text (Python's
`pydoc_data.topics`), `--new-tokens` greedy tokens with EOS ignored, batch 1, `--threads`
threads. Variants (`--variants`, "quantization[:dtype]", dtype default bfloat16): none in bf16,
gguf, int8 and int4 by default, `solo`: the GGUF's packed weights in the torch-free single-user
runtime (`kvcache.solo`, what `--solo` runs), and `llamacpp`: llama.cpp (`llama-cpp-python`) on the
same GGUF, fed the same token ids (skipped with a note when it is not installed). Every (repeat, variant) is a new Python process that loads
the model, generates once to warm up and once timed; repeats interleave the variants (the
order rotates each repeat), so a slow minute of the machine hits all of them alike.

Reported per variant (medians over repeats, with min-max): decode tok/s, prefill tok/s,
peak RSS of the process, load time, the weight bytes one decode step streams and the
achieved fraction of the memory bandwidth limit (bytes per token x tok/s / `--bandwidth-gbs`),
and how many leading generated tokens match the first variant's.

    python benchmarks/bench_quantized_decode.py                       # the measured run
    python benchmarks/bench_quantized_decode.py --new-tokens 32 --repeats 1 --no-record   # a quick check

Each run writes its record (command, commit, CPU, every process's figures) to `--record-dir`
(default benchmarks/results; the first variant's processes are the baseline); `--no-record` writes none.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from kvcache.bench import record
from kvcache.bench.common import consoles, require_at_least_one, run_main
from kvcache.errors import KVCacheError
from kvcache.models.loader import DEFAULT_MODEL

QUANTIZATIONS = ("none", "gguf", "int8", "int4")
LLAMACPP = "llamacpp"
SOLO = "solo"


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --prompt-tokens, --new-tokens, --threads: the batch-1 workload a worker runs."""
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    p.add_argument("--prompt-tokens", type=int, default=200, help="prompt length in tokens (default 200)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--threads", type=int, default=2, help="threads of every process (default 2)")


def check_workload(p: argparse.ArgumentParser, args) -> None:
    """One sentence and exit 2 for a workload option out of range."""
    require_at_least_one(p, args, ("prompt_tokens", "threads"))
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode speed excludes the first token)")


def our_variant(p: argparse.ArgumentParser, variant: str) -> str:
    """"quantization[:dtype][@thp]" spelled whole, "quantization:dtype[@thp]" (dtype bfloat16
    unless given); an unknown quantization is one sentence and exit 2."""
    v, thp = (variant[:-4], "@thp") if variant.endswith("@thp") else (variant, "")
    quant, _, dtype = v.partition(":")
    if quant not in QUANTIZATIONS:
        p.error(f"unknown quantization '{quant}' in --variants (use {', '.join(QUANTIZATIONS)})")
    return f"{quant}:{dtype or 'bfloat16'}{thp}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Batch-1 decode speed of each weight quantization, fresh processes.")
    add_workload_arguments(p)
    p.add_argument("--variants", default="none:bfloat16,gguf,int8,int4,llamacpp",
                   help="comma-separated quantization[:dtype][@thp], solo or llamacpp (default "
                        "none:bfloat16,gguf,int8,int4,llamacpp; dtype bfloat16; @thp: transparent huge pages "
                        "for PyTorch's large allocations)")
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per variant (default 5)")
    p.add_argument("--bandwidth-gbs", type=float, default=27.0,
                   help="memory bandwidth limit of this machine in GB/s (default 27)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON on stdout (the table goes to stderr)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one measurement: quantization:dtype
    p.add_argument("--serve-rounds", action="store_true", help=argparse.SUPPRESS)  # with --worker: see serve_rounds
    record.add_arguments(p)
    args = p.parse_args(argv)
    check_workload(p, args)
    require_at_least_one(p, args, ("repeats",))
    if args.bandwidth_gbs <= 0:
        p.error("--bandwidth-gbs must be positive")
    args.variant_list = []
    for v in (s.strip() for s in args.variants.split(",")):
        if not v:
            continue
        if v.removesuffix("@thp").partition(":")[0] in (LLAMACPP, SOLO):
            args.variant_list.append(v.removesuffix("@thp").partition(":")[0])
            continue
        args.variant_list.append(our_variant(p, v))
    if not args.variant_list:
        p.error("--variants is empty")
    args.record_folder = None if args.worker else record.parse_folder(p, args)
    return args


class Loaded(NamedTuple):
    """A worker's model, loaded and warmed up, with what it costs."""

    llm: object
    ids: list[int]  # the prompt
    params: object  # the timed run's SamplingParams
    dtype: str
    load_s: float
    rss_after_imports: int  # peak RSS bytes
    rss_after_load: int  # peak RSS bytes, the warm-up generate included


def _loaded(args) -> Loaded:
    """The LLM of the variant `args.worker` after one warm-up generate."""
    import time

    from kvcache.api.llm import LLM
    from kvcache.bench.common import corpus_ids, peak_rss_bytes, quiet_transformers
    from kvcache.engine.sampling import SamplingParams

    quiet_transformers()
    after_imports = peak_rss_bytes()
    quant, dtype = args.worker.removesuffix("@thp").split(":")
    t0 = time.perf_counter()
    llm = LLM(args.model, dtype=dtype, threads=args.threads, quantization=quant, progress=False,
              enable_prefix_caching=False)  # the timed prompt is computed, not found from the warm-up
    load_s = time.perf_counter() - t0
    ids = corpus_ids(llm.tokenizer, args.prompt_tokens)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([ids], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm-up
    return Loaded(llm, ids, params, dtype, load_s, after_imports, peak_rss_bytes())


def _speeds(out, ids: list[int]) -> dict:
    """Decode and prefill tok/s of one generate's output (the engine's, or the solo runtime's, whose
    output answers `metrics` with the same names)."""
    return {"decode_tok_s": out.metrics.decode_tok_s, "prefill_tok_s": len(ids) / out.metrics.ttft_s}


def measure(args) -> dict:
    """One process's figures for the variant `args.worker` (printed as one JSON line)."""
    import torch

    from kvcache.bench.common import peak_rss_bytes

    m = _loaded(args)
    out = m.llm.generate([m.ids], m.params)[0]
    return {"variant": args.worker, "quantization": m.llm.quantization, "dtype": m.dtype,
            "threads": torch.get_num_threads(), **_speeds(out, m.ids), "ttft_s": out.metrics.ttft_s,
            "load_s": m.load_s, "bytes_per_token": m.llm.model.bytes_read_per_token,
            "weight_bytes": m.llm.model.weight_bytes, "peak_rss_bytes": peak_rss_bytes(),
            "peak_rss_after_imports_bytes": m.rss_after_imports, "peak_rss_after_load_bytes": m.rss_after_load,
            "token_ids": out.token_ids}


class SoloLoaded(NamedTuple):
    """A worker's solo runtime, loaded and warmed up, with what it costs."""

    gen: object  # kvcache.solo.SoloGenerator
    ids: list[int]
    load_s: float
    rss_after_imports: int
    rss_after_load: int

    def timed(self, new_tokens: int):
        """One generate of the prompt, computed from an empty sequence: its SoloOutput."""
        from kvcache.engine.sampling_params import SamplingParams

        self.gen.model.truncate(0)  # the prompt is computed, not kept from the last run
        return self.gen.generate(self.ids, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))


def _solo_loaded(args) -> SoloLoaded:
    """The solo runtime after one warm-up generate; this process never imports torch."""
    import os
    import time

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read when the kernels' library loads
    from kvcache.bench.common import corpus_ids, peak_rss_bytes
    from kvcache.solo import load_solo

    after_imports = peak_rss_bytes()
    t0 = time.perf_counter()
    gen = load_solo(args.model)
    load_s = time.perf_counter() - t0
    m = SoloLoaded(gen, corpus_ids(gen.tokenizer, args.prompt_tokens), load_s, after_imports, 0)
    m.timed(8)  # warm-up
    return m._replace(rss_after_load=peak_rss_bytes())


def measure_solo(args) -> dict:
    """One process's figures for the solo runtime, in `measure`'s shape."""
    from kvcache.bench.common import peak_rss_bytes

    m = _solo_loaded(args)
    out = m.timed(args.new_tokens)
    if "torch" in sys.modules:
        raise KVCacheError("the solo worker imported torch.")
    w = m.gen.model.weights
    return {"variant": SOLO, "quantization": "gguf (solo, no torch)", "dtype": "float32", "threads": args.threads,
            **_speeds(out, m.ids), "ttft_s": out.ttft_s,
            "load_s": m.load_s, "bytes_per_token": w.bytes_read_per_token, "weight_bytes": w.nbytes,
            "peak_rss_bytes": peak_rss_bytes(), "peak_rss_after_imports_bytes": m.rss_after_imports,
            "peak_rss_after_load_bytes": m.rss_after_load, "token_ids": out.token_ids}


def serve_rounds(args) -> None:
    """Load once, print {"ready": ...}, then one timed generate per line read from stdin, each
    printed as one JSON line (`bench_decode_spread.py` keeps many such processes alive at once)."""
    if args.worker == SOLO:
        m = _solo_loaded(args)

        def timed() -> dict:
            return _speeds(m.timed(args.new_tokens), m.ids)
    else:
        m = _loaded(args)

        def timed() -> dict:
            return _speeds(m.llm.generate([m.ids], m.params)[0], m.ids)
    print(json.dumps({"ready": True, "load_s": m.load_s}), flush=True)
    for _ in sys.stdin:
        print(json.dumps(timed()), flush=True)


def gguf_tensor_bytes(path: Path) -> int:
    """Bytes of a GGUF's tensors: what one llama.cpp decode step streams (its head is tied to
    the embedding table, read whole; the embedding row lookup is not counted)."""
    import math

    import gguf

    from kvcache.models.gguf_weights import tensor_index

    total = 0
    for t in tensor_index(path):
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.type_name]]
        total += math.prod(t.shape) // block * size
    return total


def llamacpp_inputs(args) -> tuple[Path, Path]:
    """(the GGUF, a JSON file of the prompt ids) for `llamacpp_worker.py`: the same ids ours get."""
    import tempfile

    from kvcache.bench.common import corpus_ids
    from kvcache.models.loader import gguf_file, load_model

    path = gguf_file(args.model)
    if path is None:
        raise KVCacheError(f"the llamacpp variant needs a GGUF model, and {args.model} is not one.")
    tok = load_model(args.model, progress=False, quantization="gguf").tokenizer
    ids_file = Path(tempfile.mkdtemp()) / "ids.json"
    ids_file.write_text(json.dumps(corpus_ids(tok, args.prompt_tokens)))
    return path, ids_file


def run_llamacpp(args, gguf: Path, ids_file: Path) -> dict:
    """One llama.cpp process (`llamacpp_worker.py decode`), its figures in our row's shape."""
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "llamacpp_worker.py"), "decode", str(gguf),
           str(ids_file), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
        raise KVCacheError(f"The llamacpp run failed: {lines[-1]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    size = gguf_tensor_bytes(gguf)
    return {**r, "variant": LLAMACPP, "quantization": f"llama.cpp {r['version']}", "dtype": "-",
            "bytes_per_token": size, "weight_bytes": size}


def worker_env(variant: str) -> dict:
    """The environment of a worker process: "@thp" after the variant sets THP_MEM_ALLOC_ENABLE=1
    (PyTorch's CPU allocator then aligns allocations of 2 MB and more to 2 MB and asks for
    transparent huge pages); otherwise it is unset."""
    import os

    env = dict(os.environ)
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    if variant.endswith("@thp"):
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    return env


def run_worker(args, variant: str) -> dict:
    """One fresh process for `variant` (its environment: `worker_env`)."""
    env = worker_env(variant)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--model", args.model,
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
           "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
        raise KVCacheError(f"The {variant} run failed: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def leading_match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summarize(args, runs: dict[str, list[dict]]) -> list[dict]:
    """One row per variant: medians (and min, max) over its processes."""
    first = runs[args.variant_list[0]][0]["token_ids"]
    rows = []
    for variant, rs in runs.items():
        dec = [r["decode_tok_s"] for r in rs]
        bpt = rs[0]["bytes_per_token"]
        med = statistics.median(dec)
        rows.append({
            "variant": variant, "quantization": rs[0]["quantization"], "dtype": rs[0]["dtype"],
            "threads": rs[0]["threads"], "processes": len(rs),
            "decode_tok_s": med, "decode_tok_s_min": min(dec), "decode_tok_s_max": max(dec),
            "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in rs),
            "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in rs),
            **{k: statistics.median(r[k] for r in rs) for k in ("peak_rss_after_imports_bytes",
                                                                 "peak_rss_after_load_bytes") if k in rs[0]},
            "load_s": statistics.median(r["load_s"] for r in rs),
            "bytes_per_token": bpt, "weight_bytes": rs[0]["weight_bytes"],
            "gbs": bpt * med / 1e9, "bandwidth_fraction": bpt * med / (args.bandwidth_gbs * 1e9),
            "tokens_match_first_variant": leading_match(rs[0]["token_ids"], first),
            "new_tokens": len(rs[0]["token_ids"]),
        })
    return rows


def strip(rs: list[dict]) -> list[dict]:
    """A variant's per-process figures without the generated token ids."""
    return [{k: x for k, x in r.items() if k != "token_ids"} for r in rs]


def table(rows: list[dict], args):
    from rich import box
    from rich.table import Table

    t = Table(title=f"Batch-1 decode by weight quantization: {args.model}, {args.prompt_tokens}-token prompt, "
                    f"{args.new_tokens} new tokens, {args.threads} threads, medians of {args.repeats} processes",
              box=box.SIMPLE_HEAVY)
    for col in ("variant", "decode tok/s (min-max)", "prefill tok/s", "MB/token", "GB/s", "of limit",
                "peak RSS MB", "load s", "same tokens"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        t.add_row(r["variant"], f"{r['decode_tok_s']:.1f} ({r['decode_tok_s_min']:.0f}-{r['decode_tok_s_max']:.0f})",
                  f"{r['prefill_tok_s']:.0f}", f"{r['bytes_per_token'] / 1e6:.1f}", f"{r['gbs']:.1f}",
                  f"{r['bandwidth_fraction']:.0%}", f"{r['peak_rss_bytes'] / 1e6:.0f}", f"{r['load_s']:.1f}",
                  f"{r['tokens_match_first_variant']}/{r['new_tokens']}")
    return t


def main(argv: list[str] | None = None) -> list[dict] | None:
    args = parse_args(argv)
    if args.worker:
        if args.serve_rounds:
            serve_rounds(args)
        else:
            print(json.dumps(measure_solo(args) if args.worker == SOLO else measure(args)))
        return None
    console, err = consoles(args.json, width=140)
    runs: dict[str, list[dict]] = {v: [] for v in args.variant_list}
    n = len(args.variant_list)
    llamacpp = llamacpp_inputs(args) if LLAMACPP in args.variant_list else None
    for rep in range(args.repeats):
        for i in range(n):
            variant = args.variant_list[(i + rep) % n]  # the order rotates: no variant always runs first
            result = run_llamacpp(args, *llamacpp) if variant == LLAMACPP else run_worker(args, variant)
            runs[variant].append(result)
            err.print(f"repeat {rep + 1}/{args.repeats} {variant}: decode {result['decode_tok_s']:.1f} tok/s, "
                      f"prefill {result['prefill_tok_s']:.0f} tok/s")
    rows = summarize(args, runs)
    console.print(table(rows, args))
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        sys.stdout.flush()
    record.save("bench_quantized_decode", "python benchmarks/bench_quantized_decode.py", argv, args.record_folder,
                threads=args.threads, config=record.config_of(args),
                results=rows, timings={v: strip(rs) for v, rs in runs.items() if v != args.variant_list[0]},
                baseline_timings={args.variant_list[0]: strip(runs[args.variant_list[0]])})
    return rows


if __name__ == "__main__":
    run_main(main)
