"""Pieces every benchmark shares: real text to feed the model, and quiet, wide consoles."""

from __future__ import annotations

import sys
from functools import lru_cache


@lru_cache(maxsize=1)
def corpus_text() -> str:
    """Real English/Python prose no one here wrote: the pydoc topics shipped with Python."""
    try:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    except ImportError:  # stripped Python builds
        import argparse
        import inspect

        return inspect.getsource(argparse)


def corpus_ids(tokenizer, n: int | None = None) -> list[int]:
    """Token ids of the corpus (all of it, or exactly the first n, repeating if it is short)."""
    text = corpus_text()
    if n is not None:  # tokenize only a slice: ~4 chars/token, with margin
        text = text[: max(4096, 8 * n)]
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if n is None:
        return ids
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def consoles(json_mode: bool, width: int = 130):
    """(console for the report, console for progress): with --json the report goes to stderr
    so stdout carries only JSON; a redirected console gets a fixed width so tables are not cut."""
    from rich.console import Console

    out = Console(stderr=json_mode)
    if not out.is_terminal:
        out = Console(stderr=json_mode, width=width)
    err = Console(stderr=True)
    if not err.is_terminal:
        err = Console(stderr=True, width=width)
    return out, err


def quiet_transformers() -> None:
    """Silence transformers' logging and progress bars (they would interleave with ours)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def save_figure(fig, path, console) -> None:
    """Lay out and write a matplotlib figure as a PNG (its folder made), and say where."""
    from pathlib import Path

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    console.print(f"plot: {path}")


def print_json(args, **results) -> None:
    """With `--json`, one JSON object on stdout: the run's options under "config", then `results`."""
    import json

    if args.json:
        print(json.dumps({"config": vars(args), **results}, default=str))


# CPU features that decide which kernels run (x86 /proc/cpuinfo names)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def peak_rss_bytes() -> int:
    """This process's peak resident set since it started its program: VmHWM, which execve resets
    (getrusage's ru_maxrss keeps the peak of the process that forked it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def require_at_least_one(parser, args, names) -> None:
    """`parser.error` (one sentence, exit 2) for the first option in `names` (attribute names of
    `args`) below 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")


def cpu_info(cpuinfo: str | None = None) -> dict:
    """The CPU's model name, logical core count and which of CPU_FLAGS it has, read from
    /proc/cpuinfo (or the given text of one); elsewhere the platform's name and no flags."""
    import os
    import platform

    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    name, flags, processors = "", set(), 0
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            processors += 1
        elif key == "model name" and not name:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return {"model": name or platform.processor() or platform.machine(),
            "cores": processors or os.cpu_count(),
            "flags": {f: f in flags for f in CPU_FLAGS}}


def machine_info() -> dict:
    """The CPU the figures come from: model name, core count, its vector extensions (x86), and
    whether the native kernels were built with the prefill kernel (AVX-512 builds only)."""
    from kvcache.native import ops as native

    cpu = cpu_info()
    return {"cpu": cpu["model"], "cores": cpu["cores"], **cpu["flags"],
            "amx": any(cpu["flags"][f] for f in ("amx_tile", "amx_bf16", "amx_int8")),
            "native_prefill_kernel": native.prefill_attention_built()}


def run_main(main) -> None:
    """Run a benchmark script's `main()`: bad input (a KVCacheError) is one sentence and exit status 1."""
    from kvcache.errors import KVCacheError

    try:
        main()
    except KVCacheError as exc:
        sys.exit(f"error: {exc}")
