"""llama.cpp (`llama-cpp-python`) on a GGUF, fed token ids from a JSON file: one measurement
per process, printed as one JSON line. It imports neither torch nor kvcache, so its peak RSS
is llama.cpp's own (with Python and NumPy).

    python benchmarks/llamacpp_worker.py decode MODEL.gguf IDS.json --new-tokens 128 --threads 2
    python benchmarks/llamacpp_worker.py perplexity MODEL.gguf IDS.json --context 1024 --threads 2
    python benchmarks/llamacpp_worker.py rounds MODEL.gguf IDS.json   # a timed decode per stdin line

decode: prefill is one `eval` of the prompt plus the first greedy token, decode the `eval`s of
the rest (the split `kvcache`'s metrics use). perplexity: the ids in windows of `--context`
tokens, each window from an empty cache, every position after the first of a window scored
(`logits_all`), as `kvcache.eval.perplexity` does with the same windows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time


def peak_rss_bytes() -> int:
    """`kvcache.bench.common.peak_rss_bytes`, its module loaded by path: importing the package
    would import torch into this process."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "src" / "kvcache" / "bench" / "common.py"
    spec = importlib.util.spec_from_file_location("kvcache_bench_common", path)
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    return common.peak_rss_bytes()


def _model(path: str, threads: int, n_ctx: int, logits_all: bool, use_mmap: bool = True):
    import llama_cpp

    return llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                           n_batch=min(n_ctx, 512), logits_all=logits_all, use_mmap=use_mmap, verbose=False)


def _decoder(args, ids: list[int]):
    """(run(n_new) -> (token ids, prefill s, decode s), load seconds) after one warm-up run."""
    import numpy as np

    t0 = time.perf_counter()
    model = _model(args.gguf, args.threads, max(512, len(ids) + args.new_tokens + 8), False, not args.no_mmap)
    load_s = time.perf_counter() - t0
    vocab = model.n_vocab()

    def greedy() -> int:
        return int(np.argmax(np.ctypeslib.as_array(model._ctx.get_logits(), shape=(vocab,))))

    def run(n_new: int) -> tuple[list[int], float, float]:
        model.reset()
        t0 = time.perf_counter()
        model.eval(ids)
        out = [greedy()]
        t1 = time.perf_counter()
        for _ in range(n_new - 1):
            model.eval([out[-1]])
            out.append(greedy())
        return out, t1 - t0, time.perf_counter() - t1

    run(8)  # warm-up
    return run, load_s


def _figures(ids: list[int], out: list[int], ttft: float, dec: float) -> dict:
    return {"decode_tok_s": (len(out) - 1) / dec, "prefill_tok_s": len(ids) / ttft, "ttft_s": ttft}


def decode(args, ids: list[int]) -> dict:
    run, load_s = _decoder(args, ids)
    after_load = peak_rss_bytes()  # the warm-up run included
    out, ttft, dec = run(args.new_tokens)
    return {**_figures(ids, out, ttft, dec), "load_s": load_s, "token_ids": out,
            "peak_rss_after_imports_bytes": args.rss_after_imports, "peak_rss_after_load_bytes": after_load}


def rounds(args, ids: list[int]) -> None:
    """Load once, print {"ready": ...}, then one timed decode per line read from stdin, each
    printed as one JSON line."""
    run, load_s = _decoder(args, ids)
    print(json.dumps({"ready": True, "load_s": load_s}), flush=True)
    for _ in sys.stdin:
        print(json.dumps(_figures(ids, *run(args.new_tokens))), flush=True)


def perplexity(args, ids: list[int]) -> dict:
    import numpy as np

    model = _model(args.gguf, args.threads, args.context, True)
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, args.context):
        window = ids[start:start + args.context]
        if len(window) < 2:
            break
        model.reset()
        model.eval(window)
        logits = np.asarray(model.scores[:len(window) - 1], dtype=np.float64)  # (T-1, V)
        top = logits.max(1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(logits - top).sum(1))
        nll += float((logz - logits[np.arange(len(window) - 1), window[1:]]).sum())
        count += len(window) - 1
    return {"perplexity": math.exp(nll / count), "tokens_scored": count}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["decode", "perplexity", "rounds"])
    p.add_argument("gguf")
    p.add_argument("ids", help="a JSON file holding a list of token ids")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-mmap", action="store_true",
                   help="read the weights into the process's own memory instead of mapping the file")
    args = p.parse_args()
    with open(args.ids) as f:
        ids = json.load(f)
    try:
        import llama_cpp
    except ImportError:
        sys.exit("error: llama-cpp-python is not installed (pip install -e '.[bench]').")
    args.rss_after_imports = peak_rss_bytes()
    if args.mode == "rounds":
        rounds(args, ids)
        return
    result = decode(args, ids) if args.mode == "decode" else perplexity(args, ids)
    result.update(version=llama_cpp.__version__, threads=args.threads,
                  peak_rss_bytes=peak_rss_bytes())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
