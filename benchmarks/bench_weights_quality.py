"""What each weight quantization costs in quality, against float weights and llama.cpp.

1. Perplexity over the first `--contexts` tokens (default 1024 and 4096) of the eval corpus
   (`kvcache.eval.corpus`), one window each from an empty cache, for quantization none (the
   GGUF dequantized: the float reference), gguf (its packed formats, activations quantized
   per row to int8 by the kernels), int8 and int4 (quantized at load from the float weights),
   the same packed weights in the torch-free single-user runtime (`solo`: `--solo`, its prompts
   through the packed kernels with int8 activations), and llama.cpp's own perplexity on the same
   token ids (`llamacpp_worker.py perplexity`, `logits_all`; skipped with a note when
   `llama-cpp-python` is not installed).
2. Greedy output of gguf against none on 20 chat prompts (`--new-tokens` each): how many
   replies match token for token, and where each first divergence sits.

    python benchmarks/bench_weights_quality.py --threads 2            # the measured run
    python benchmarks/bench_weights_quality.py --contexts 256 --prompts 2 --new-tokens 8 --no-record
    python benchmarks/bench_weights_quality.py --requantize Q4_K_M   # a K-quant file of the same model

`--requantize FTYPE` first writes the model's GGUF requantized by llama.cpp's own quantizer
(`llama_model_quantize`, e.g. Q4_K_M or Q6_K; rows that do not divide into 256 fall back to
llama.cpp's Q5_0 / Q8_0) to a temporary file, and measures that file: what our load-time
requantization of K-quants and 5-bit formats costs against the same file dequantized.

Each run writes its record to `--record-dir` (default benchmarks/results; `none` is the baseline).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvcache.bench import record
from kvcache.bench.common import consoles, require_at_least_one, run_main
from kvcache.errors import KVCacheError
from kvcache.models.loader import DEFAULT_MODEL

QUANTIZATIONS = ("none", "gguf", "int8", "int4")
ROWS = QUANTIZATIONS + ("solo",)
CHAT_PROMPTS = [
    "What is a KV cache in a language model?", "Name three primary colors.",
    "Write a haiku about autumn leaves.", "Explain photosynthesis to a ten-year-old.",
    "What is the capital of Australia?", "Give me a recipe for pancakes.",
    "How does a bicycle stay upright?", "Translate 'good morning' into French and Spanish.",
    "What are the planets of the solar system?", "Write a Python function that reverses a string.",
    "Why is the sky blue?", "Summarize the plot of Romeo and Juliet.",
    "What is the difference between weather and climate?", "List five tips for better sleep.",
    "How do vaccines work?", "What is 17 times 23?", "Describe the water cycle.",
    "What is machine learning?", "Suggest a name for a friendly robot.", "How do I boil an egg?",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Perplexity and greedy agreement per weight quantization.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a GGUF model (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", help="activations of our runs (default float32)")
    p.add_argument("--contexts", default="1024,4096", help="perplexity windows in tokens (default 1024,4096)")
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk of our perplexity passes (default 256)")
    p.add_argument("--prompts", type=int, default=len(CHAT_PROMPTS), help="chat prompts of part 2 (default 20)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per chat reply (default 64)")
    p.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads (default 2)")
    p.add_argument("--skip-llamacpp", action="store_true", help="skip llama.cpp's perplexity")
    p.add_argument("--requantize", default=None, metavar="FTYPE",
                   help="measure the model's GGUF requantized by llama.cpp to FTYPE (e.g. Q4_K_M, Q6_K)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    record.add_arguments(p)
    args = p.parse_args(argv)
    try:
        args.context_list = sorted({int(c) for c in args.contexts.split(",") if c.strip()})
    except ValueError:
        p.error(f"--contexts must be comma-separated integers, got '{args.contexts}'")
    if not args.context_list or min(args.context_list) < 2:
        p.error("--contexts needs windows of at least 2 tokens")
    require_at_least_one(p, args, ("chunk", "new_tokens", "threads"))
    if not 1 <= args.prompts <= len(CHAT_PROMPTS):
        p.error(f"--prompts must be between 1 and {len(CHAT_PROMPTS)}")
    args.record_folder = record.parse_folder(p, args)
    return args


def llamacpp_perplexity(args, ids: list[int], context: int) -> dict:
    from kvcache.models.loader import gguf_file

    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "ids.json"
        ids_file.write_text(json.dumps(ids[:context]))
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "llamacpp_worker.py"), "perplexity",
               str(gguf_file(args.model)), str(ids_file), "--context", str(context), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
        return {"note": lines[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def requantized_gguf(args, folder: Path) -> Path:
    """The model's GGUF requantized by llama.cpp's quantizer to `args.requantize`, in `folder`
    (in a child process: the quantizer prints every tensor to stderr)."""
    from kvcache.models.loader import gguf_file

    out = folder / f"{gguf_file(args.model).stem}-{args.requantize}.gguf"
    code = f"""
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_{args.requantize.upper()}")
p.allow_requantize, p.nthread = True, {args.threads}
sys.exit(llama_cpp.llama_model_quantize({str(gguf_file(args.model))!r}.encode(), {str(out)!r}.encode(), ctypes.byref(p)))
"""
    done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0 or not out.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise KVCacheError(f"llama.cpp could not requantize {args.model} to {args.requantize}: {last}")
    return out


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first index where the two token lists differ (the shorter one's end counts), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv: list[str] | None = None) -> dict:
    import torch

    from kvcache import LLM, SamplingParams
    from kvcache.eval.corpus import corpus_token_ids
    from kvcache.eval.perplexity import perplexity
    from kvcache.models.loader import gguf_file

    args = parse_args(argv)
    scratch = tempfile.TemporaryDirectory()
    if args.requantize and gguf_file(args.model) is not None:
        args.source_model, args.model = args.model, str(requantized_gguf(args, Path(scratch.name)))
    if gguf_file(args.model) is None:
        raise KVCacheError(f"{args.model} is not a GGUF model; this benchmark compares a GGUF's formats.")
    console, err = consoles(args.json, width=130)
    torch.set_num_threads(args.threads)
    ppl: dict[str, dict[str, float]] = {}
    replies: dict[str, list[list[int]]] = {}
    ids = None
    greedy = SamplingParams(max_tokens=args.new_tokens, temperature=0.0)
    for q in QUANTIZATIONS:
        t0 = time.perf_counter()
        llm = LLM(args.model, dtype=args.dtype, quantization=q, progress=False, enable_prefix_caching=False)
        if ids is None:
            ids = corpus_token_ids(llm.tokenizer, max(args.context_list))
        ppl[q] = {str(c): perplexity(llm, ids, c, chunk=args.chunk) for c in args.context_list}
        if q in ("none", "gguf"):
            prompts = [llm.chat_ids([{"role": "user", "content": m}]) for m in CHAT_PROMPTS[:args.prompts]]
            outs = llm.generate(prompts, greedy)
            replies[q] = [list(o.token_ids) for o in outs]
        err.print(f"{q}: perplexity {ppl[q]} ({time.perf_counter() - t0:.0f} s)")
        del llm
    import math

    from kvcache.solo import load_solo

    solo = load_solo(args.model, max(args.context_list))
    ppl["solo"] = {}
    for c in args.context_list:
        solo.model.truncate(0)
        ppl["solo"][str(c)] = math.exp(solo.model.token_losses(ids[:c]).mean())
    err.print(f"solo: perplexity {ppl['solo']}")
    del solo
    llamacpp = {}
    if not args.skip_llamacpp:
        for c in args.context_list:
            llamacpp[str(c)] = llamacpp_perplexity(args, ids, c)
            err.print(f"llama.cpp {c}: {llamacpp[str(c)]}")
    div = [first_divergence(a, b) for a, b in zip(replies["none"], replies["gguf"])]
    from collections import Counter

    from kvcache.models.gguf_weights import tensor_index

    result = {
        "model_file": gguf_file(args.model).name,
        "gguf_types": dict(Counter(t.type_name for t in tensor_index(gguf_file(args.model)))),
        "perplexity": ppl,
        "perplexity_vs_none": {q: {c: ppl[q][c] / ppl["none"][c] - 1 for c in ppl[q]} for q in ROWS},
        "llamacpp_perplexity": {c: r.get("perplexity") for c, r in llamacpp.items()},
        "llamacpp_notes": {c: r["note"] for c, r in llamacpp.items() if "note" in r},
        "gguf_vs_llamacpp": {c: ppl["gguf"][c] / r["perplexity"] - 1 for c, r in llamacpp.items() if "perplexity" in r},
        "greedy": {"prompts": len(div), "identical": sum(d is None for d in div), "first_divergence": div,
                   "new_tokens": args.new_tokens},
    }
    from rich.table import Table

    t = Table(title=f"Weight quantization quality: {args.model}, {args.dtype} activations, {args.threads} threads")
    t.add_column("weights")
    for c in args.context_list:
        t.add_column(f"ppl @{c}", justify="right")
        t.add_column("vs none", justify="right")
    for q in ROWS:
        t.add_row(q, *[x for c in args.context_list
                       for x in (f"{ppl[q][str(c)]:.3f}", f"{result['perplexity_vs_none'][q][str(c)]:+.2%}")])
    if result["llamacpp_perplexity"]:
        t.add_row("llama.cpp", *[x for c in args.context_list for x in (
            f"{result['llamacpp_perplexity'].get(str(c)) or float('nan'):.3f}", "")])
    console.print(t)
    g = result["greedy"]
    console.print(f"greedy gguf vs none: {g['identical']}/{g['prompts']} replies identical over {args.new_tokens} "
                  f"tokens; first divergences at {[d for d in div if d is not None]}")
    if args.json:
        sys.stdout.write(json.dumps(record.json_safe(result), indent=1) + "\n")
    record.save("bench_weights_quality", "python benchmarks/bench_weights_quality.py", argv, args.record_folder,
                threads=args.threads, config=record.config_of(args),
                results=record.json_safe(result), timings={q: ppl[q] for q in ROWS if q != "none"},
                baseline_timings={"none": ppl["none"]})
    return result


if __name__ == "__main__":
    run_main(main)
