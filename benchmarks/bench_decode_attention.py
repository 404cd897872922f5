"""Decode attention over a paged KV pool: the native kernel vs torch's gather + SDPA.

Setup: a pool of `--kv-budget` in the model's KV shape (default model: 30 layers, 3 KV heads,
head_dim 64, 9 query heads), blocks of `--block-size` tokens, and `--batch` rows of `--tokens`
tokens each on blocks drawn at random from the pool (as a long-running server's free queue
hands them out). One step is one query per row attending to its tokens in every layer.

- native: `PagedKVStorage.decode_attention` per layer, read in place (what the engine runs);
- torch: `read_rows` (gather each row's blocks) + `models.sdpa.grouped_sdpa` (SDPA, masked when
  rows differ in length): the engine's path without the native kernels.

"from memory" walks the layers 0..L-1, so each layer's K/V come from DRAM as in a forward
pass (once the pool outgrows the caches); "in cache" reads layer 0 every time. GB/s counts
the K/V bytes a step must read (rows x tokens x bytes per token) over its median time, next
to `--bandwidth-gbs`.

    python benchmarks/bench_decode_attention.py                     # a full pool: 36 rows x 310 tokens
    python benchmarks/bench_decode_attention.py --batch 8 --tokens 900 --json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from rich import box
from rich.table import Table

from kvcache.api.llm import parse_dtype
from kvcache.bench import record
from kvcache.bench.common import consoles, machine_info, require_at_least_one
from kvcache.bench.timing import sample_times
from kvcache.cache.spec import KVFormat, kv_bytes_per_token, model_shape, parse_size
from kvcache.cache.storage import PagedKVStorage, decode_rows, slot_mask
from kvcache.engine.config import blocks_for_budget
from kvcache.errors import KVCacheError
from kvcache.models.sdpa import grouped_sdpa as attend
from kvcache.models.loader import DEFAULT_MODEL


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Decode attention over a paged KV pool: native kernel vs gather + SDPA.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model whose KV shape to use (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="bfloat16", help="KV dtype, float32 or bfloat16 (default bfloat16)")
    p.add_argument("--kv-budget", default="256MiB", help="pool size (default 256MiB)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block (default 16)")
    p.add_argument("--batch", type=int, default=36, help="rows (default 36: a full 256 MiB bf16 pool)")
    p.add_argument("--tokens", type=int, default=310, help="tokens per row (default 310)")
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads (default 2)")
    p.add_argument("--repeats", type=int, default=15, help="timed steps per measurement (default 15)")
    p.add_argument("--bandwidth-gbs", type=float, default=43.0,
                   help="this machine's memory bandwidth for the fraction column (default 43: torch.sum "
                        "over 1 GiB, 2 threads, measured here)")
    p.add_argument("--seed", type=int, default=0, help="block placement seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (table goes to stderr)")
    record.add_arguments(p)
    a = p.parse_args(argv)
    require_at_least_one(p, a, ("block_size", "batch", "tokens", "threads", "repeats"))
    a.record_folder = record.parse_folder(p, a)
    try:
        a.kv_budget_bytes = parse_size(a.kv_budget)
        a.torch_dtype = parse_dtype(a.dtype)
        a.shape = model_shape(a.model)
    except KVCacheError as exc:
        p.error(str(exc))
    return a


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    console, _ = consoles(args.json)
    sh, bs = args.shape, args.block_size
    num_blocks = blocks_for_budget(args.kv_budget_bytes, bs, kv_bytes_per_token(sh, KVFormat.parse(args.dtype)))
    per_row = -(-args.tokens // bs)
    if args.batch * per_row > num_blocks:
        raise SystemExit(f"{args.batch} rows of {args.tokens} tokens need {args.batch * per_row} blocks; "
                         f"a {args.kv_budget} pool holds {num_blocks}.")
    st = PagedKVStorage(sh.num_layers, num_blocks, bs, sh.num_kv_heads, sh.head_dim, args.torch_dtype)
    gen = torch.Generator().manual_seed(args.seed)
    st.k.copy_(torch.randn(st.k.shape, generator=gen))  # every slot written: no page is left to fault in
    st.v.copy_(torch.randn(st.v.shape, generator=gen))
    blocks = torch.randperm(num_blocks, generator=gen)[: args.batch * per_row].view(args.batch, per_row)  # (B, NB)
    lens = [args.tokens] * args.batch
    table, lo, hi = decode_rows(blocks, lens)
    q = torch.randn(sh.num_layers, args.batch, sh.num_heads, sh.head_dim, generator=gen).to(args.torch_dtype)
    mask = slot_mask(blocks, lens, bs) if args.tokens % bs else None  # (B, 1, 1, S)

    def native_step(layers):
        for layer in layers:
            st.decode_attention(layer, q[layer], table, lo, hi)  # (B, Hq, D)

    def torch_step(layers):
        for layer in layers:
            k, v = st.read_rows(layer, blocks)  # (B, Hkv, S, D)
            attend(q[layer][:, :, None], k, v, mask)  # (B, 1, Hq*D)

    # the two paths agree (layer 0), or their times mean nothing
    k0, v0 = st.read_rows(0, blocks)
    want = attend(q[0][:, :, None].float(), k0.float(), v0.float(), mask).view(args.batch, sh.num_heads, -1)
    got = st.decode_attention(0, q[0], table, lo, hi).float()
    err = (got - want).abs().max().item()

    kernels = [("native", native_step)] if st.attention.reads_in_place else []
    kernels.append(("torch (gather + SDPA)", torch_step))
    step_bytes = args.batch * args.tokens * st.bytes_per_token
    rows = []
    for name, step in kernels:
        for where, layers in (("from memory", range(sh.num_layers)), ("in cache", [0] * sh.num_layers)):
            runs = [1e3 * t for t in sample_times(lambda: step(layers), args.repeats, warmup=2)]
            ms = statistics.median(runs)
            gbs = step_bytes / ms / 1e6
            rows.append({"kernel": name, "reads": where, "ms_per_step": ms, "gbs": gbs,
                         "bandwidth_fraction": gbs / args.bandwidth_gbs, "ms_runs": runs})
    by = {(r["kernel"], r["reads"]): r["ms_per_step"] for r in rows}
    speedups = {where: by[("torch (gather + SDPA)", where)] / by[("native", where)]
                for where in ("from memory", "in cache") if ("native", where) in by}

    m = machine_info()
    table_out = Table(title=f"decode attention, {args.batch} rows x {args.tokens} tokens, {sh.num_layers} layers, "
                            f"{args.dtype} pool of {num_blocks} blocks ({args.threads} threads; {m['cpu']})",
                      box=box.SIMPLE_HEAD)
    for col in ("kernel", "reads", "ms / step", "GB/s", f"of {args.bandwidth_gbs:g} GB/s"):
        table_out.add_column(col, justify="left" if col in ("kernel", "reads") else "right")
    for r in rows:
        table_out.add_row(r["kernel"], r["reads"], f"{r['ms_per_step']:.2f}", f"{r['gbs']:.1f}",
                          f"{100 * r['bandwidth_fraction']:.0f}%")
    console.print(table_out)
    for where, x in speedups.items():
        console.print(f"native vs torch, {where}: {x:.2f}x")
    console.print(f"max |native - torch| on layer 0: {err:.2e}")
    config = {k: v for k, v in vars(args).items() if k not in ("torch_dtype", "shape", "record_folder")}
    result = {"config": config, "machine": m, "num_blocks": num_blocks, "bytes_per_step": step_bytes, "rows": rows,
              "speedups": speedups, "max_abs_diff": err}
    if args.json:
        print(json.dumps(result, indent=2))
    native = [r for r in rows if r["kernel"] == "native"]
    record.save("bench_decode_attention", "python benchmarks/bench_decode_attention.py", argv, args.record_folder,
                threads=args.threads, config=config, machine=m, results=result,
                timings={f"native {r['reads']}": r["ms_runs"] for r in native},
                baseline_timings={f"torch {r['reads']}": r["ms_runs"] for r in rows if r not in native})
    return result


if __name__ == "__main__":
    main()
