"""Pieces every benchmark shares: real text to feed the model, and quiet, wide consoles."""

from __future__ import annotations

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


def machine_info() -> dict:
    """The CPU the figures come from: model name, core count, its vector extensions (x86), and
    whether the native kernels were built with the prefill kernel (AVX-512 builds only)."""
    import os
    import platform

    from kvcache import native

    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:  # Linux; elsewhere only the architecture is known
            for line in f:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    return {"cpu": name, "cores": os.cpu_count(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "native_prefill_kernel": native.prefill_attention_built()}

