"""Micro-benchmark of `kvcache.cache.quant`: dequantize, quantize, scores from quantized keys.

One layer of SmolLM2's cache at 4k tokens, (1, 3, 4096, 64), groups of 32:

1. dequantize the layer into a preallocated buffer (``QuantizedBuffer.dequantize_into``),
   int8/int4/int2, keys per channel and values per token, against copying the same layer
   from a float32 cache into the buffer (what a float cache's attention read costs);
2. quantize cost per appended group: 32 tokens of keys (per channel), 1 token of values;
3. decode scores q @ K^T for the 3 folded GQA queries: ``quantized_scores`` from the codes
   against dequantize-then-matmul (same scratch buffer) and against float32 keys.

Medians over ``--repeats`` runs, one thread by default.

    python benchmarks/bench_quant.py                 # a few seconds
    python benchmarks/bench_quant.py --threads 2 --repeats 100 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics

import torch
from rich.console import Console
from rich.table import Table

from kvcache.bench import record
from kvcache.bench.timing import sample_times
from kvcache.cache.quant import BITS, QuantizedBuffer, dequantize, quantize, quantized_scores


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--queries", type=int, default=3, help="query rows per KV head (GQA folded)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    record.add_arguments(ap)
    args = ap.parse_args(argv)
    folder = record.parse_folder(ap, args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    S, H, D, g, reps = args.tokens, args.kv_heads, args.head_dim, args.group_size, args.repeats
    x = torch.randn(1, H, S, D)  # (B, Hkv, S, D) one layer's K (or V)
    exact = x.to(dtype)  # the float cache's copy
    out = torch.empty(1, H, S, D, dtype=dtype)  # the attention path's scratch buffer
    ours: dict[str, list[float]] = {}  # every repeat, microseconds: the quantized paths
    theirs: dict[str, list[float]] = {}  # and the float ones they are compared with

    def median_us(fn, label: str, into: dict) -> float:
        into[label] = [t * 1e6 for t in sample_times(fn, reps, warmup=3)]
        return statistics.median(into[label])

    copy_us = median_us(lambda: out.copy_(exact), "copy", theirs)
    title = f"quant micro-benchmark: one layer (1, {H}, {S}, {D}), group {g}, {args.dtype}, " \
            f"{args.threads} thread(s), median of {reps}"
    table = Table(title=title)
    for col in ("format", "axis", "stored KiB", "dequantize us", "vs copy",
                "quantize us", "per append of"):
        table.add_column(col, justify="right")
    table.add_row(args.dtype, "-", f"{exact.numel() * exact.element_size() / 1024:.0f}",
                  f"{copy_us:.0f}", "1.00x", "-", "-")
    for bits in BITS:
        for axis in ("channel", "token"):
            store = QuantizedBuffer(1, 1, H, D, bits, g, axis, capacity_tokens=S)
            store.append(0, x)
            deq_us = median_us(lambda: store.dequantize_into(0, out), f"dequantize int{bits} {axis}", ours)
            step = g if axis == "channel" else 1
            piece = x[:, :, :step]

            def append() -> None:
                store.truncate(S - step if axis == "token" else S - g)
                store.append(0, piece)

            q_us = median_us(append, f"quantize int{bits} {axis}", ours)
            table.add_row(f"int{bits}", axis, f"{store.nbytes / 1024:.0f}", f"{deq_us:.0f}",
                          f"{deq_us / copy_us:.2f}x", f"{q_us:.0f}", f"{step} token{'s' * (step > 1)}")
    console = Console(width=110)
    console.print(table)

    query = torch.randn(1, H, args.queries, D).to(dtype)  # (B, Hkv, G, D)
    scores = Table(title=f"decode scores q @ K^T, {args.queries} queries x {S} keys per KV head")
    for col in ("keys", "from codes us", "dequantize + matmul us", f"{args.dtype} keys us"):
        scores.add_column(col, justify="right")
    float_us = median_us(lambda: query @ exact.transpose(-1, -2), "scores float", theirs)
    for bits in BITS:
        k = quantize(x, bits, g, "channel")
        direct = median_us(lambda: quantized_scores(query, k, codes_out=out), f"scores int{bits} from codes", ours)
        via = median_us(lambda: query @ dequantize(k, out=out).transpose(-1, -2),
                        f"scores int{bits} dequantize + matmul", ours)
        scores.add_row(f"int{bits} per channel", f"{direct:.0f}", f"{via:.0f}", f"{float_us:.0f}")
    console.print(scores)
    medians = {k: statistics.median(v) for k, v in {**ours, **theirs}.items()}
    record.save("bench_quant", "python benchmarks/bench_quant.py", argv, folder, threads=args.threads,
                config=vars(args), results={"median_us": medians}, timings=ours, baseline_timings=theirs)


if __name__ == "__main__":
    main()
