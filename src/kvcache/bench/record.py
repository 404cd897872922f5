"""Benchmark records: every benchmark run writes one JSON file, so a quoted figure can be traced.

A record holds what is needed to judge and repeat a figure: the command line, the git commit
(and whether the tree had uncommitted changes), the date (UTC), the CPU (model, cores, the
vector and matrix extensions that pick the kernels), the thread count, the run's own raw
timings and those of the baseline it was compared with in the same invocation, and the
benchmark's full results. Files go to `benchmarks/results/` by default, named
`<benchmark>-<date>-<shortcommit>.json`; the docs cite them (see benchmarks/README.md).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from kvcache.errors import KVCacheError

DEFAULT_RECORD_DIR = "benchmarks/results"
SCHEMA = 1


def json_safe(x):
    """NaN and infinities become None (JSON has neither), recursively; tuples become lists and
    anything else JSON cannot hold (a path, a dtype) its text."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)


def command_line(prog: str, argv: list[str] | None = None) -> str:
    """The command as a shell would run it again: `prog` and the arguments (sys.argv's by default)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join([prog, *(shlex.quote(a) for a in args)])


def git_state(where: str | Path | None = None) -> dict:
    """{"commit": full hash or None, "dirty": whether tracked files differ from it (None if unknown)}
    for the checkout holding `where` (default: this package's source)."""
    where = Path(where) if where is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def prepare_dir(path: str | Path) -> Path:
    """Make the record folder (and its parents) and check it takes files, before any long work:
    a folder that cannot be written is one sentence (KVCacheError), not a lost run."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KVCacheError(f"Cannot create the record folder {folder}: {exc.strerror or exc}.") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise KVCacheError(f"The record folder {folder} is not writable.")
    return folder


def build_record(benchmark: str, command: str, *, threads: int, timings: dict, baseline_timings: dict,
                 results, config: dict | None = None, machine: dict | None = None, git: dict | None = None,
                 now: datetime | None = None) -> dict:
    """The record as a dict. `timings`: this run's raw measurements (every repeat, not only
    medians); `baseline_timings`: the baselines' from the same invocation ({} with the reason in
    `results` where a baseline was skipped); `results`: the benchmark's own output."""
    if not benchmark or any(c in benchmark for c in "/\\ "):
        raise ValueError(f"benchmark name {benchmark!r} must be a plain word (it names the file)")
    if not isinstance(timings, dict) or not isinstance(baseline_timings, dict):
        raise TypeError("timings and baseline_timings must be dicts")
    if machine is None:
        from kvcache.bench.common import machine_info

        machine = machine_info()
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    import torch

    return json_safe({
        "schema": SCHEMA,
        "benchmark": benchmark,
        "command": command,
        "git": git if git is not None else git_state(),
        "date": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "machine": machine,
        "threads": threads,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "config": config or {},
        "timings": timings,
        "baseline_timings": baseline_timings,
        "results": results,
    })


def record_name(record: dict) -> str:
    """`<benchmark>-<date>-<shortcommit>`: the date without colons (safe in every file system);
    `nogit` when the source is not a git checkout, `+dirty` when it had uncommitted changes."""
    date = record["date"].replace("-", "").replace(":", "")  # 20250101T120000Z
    commit = (record["git"].get("commit") or "nogit")[:10]
    dirty = "+dirty" if record["git"].get("dirty") else ""
    return f"{record['benchmark']}-{date}-{commit}{dirty}"


def write_record(record: dict, folder: str | Path = DEFAULT_RECORD_DIR) -> Path:
    """Write `record` as `<folder>/<record_name>.json` (a `-2`, `-3`... suffix if that name is
    taken, never overwriting) and return its path."""
    folder = prepare_dir(folder)
    text = json.dumps(record, indent=1, allow_nan=False) + "\n"
    base = record_name(record)
    for n in range(1, 1000):
        path = folder / (f"{base}.json" if n == 1 else f"{base}-{n}.json")
        try:
            with open(path, "x", encoding="utf-8") as f:
                f.write(text)
            return path
        except FileExistsError:
            continue
    raise KVCacheError(f"Too many records named {base} in {folder}.")


def save(benchmark: str, prog: str, argv: list[str] | None, folder: str | Path | None, **fields) -> Path | None:
    """Build and write a record in one call (folder None: recording is off) and say where on
    stderr; every benchmark ends with it, after its results are printed, so a failure to write
    (one sentence, KVCacheError) loses nothing shown."""
    if folder is None:
        return None
    record = build_record(benchmark, command_line(prog, argv), **fields)
    try:
        path = write_record(record, folder)
    except OSError as exc:
        raise KVCacheError(f"The record could not be written to {folder}: {exc.strerror or exc}.") from None
    print(f"record: {path}", file=sys.stderr)
    return path


def config_of(args) -> dict:
    """A benchmark's parsed options as its record's `config`: every flag, without the record
    folder `parse_folder` derived from them."""
    return {k: v for k, v in vars(args).items() if k != "record_folder"}


def add_arguments(parser) -> None:
    """`--record-dir` and `--no-record`, the same on every benchmark."""
    parser.add_argument("--record-dir", default=DEFAULT_RECORD_DIR,
                        help=f"folder for this run's JSON record (default {DEFAULT_RECORD_DIR})")
    parser.add_argument("--no-record", action="store_true", help="write no record (quick checks)")


def folder_from_args(args) -> Path | None:
    """The checked record folder of parsed `add_arguments` flags, or None with --no-record."""
    return None if args.no_record else prepare_dir(args.record_dir)


def parse_folder(parser, args) -> Path | None:
    """`folder_from_args` for a benchmark script: a folder that cannot be written is the parser's
    error (one sentence, exit 2)."""
    try:
        return folder_from_args(args)
    except KVCacheError as exc:
        parser.error(str(exc))
