"""transformers' own generation tests with kvcache.hf's caches in place of DynamicCache.

Runs the `GenerationTesterMixin` tests of transformers' test suite (greedy, sampling, beam
search, beam sampling, left-padding compatibility, assisted and prompt-lookup decoding with
their cache crops, continuing from a cache, inputs_embeds, position ids...) on a tiny random
Llama (benchmarks/hf_suite_llama.py), once per `--policies` entry, each in its own pytest
process with benchmarks/hf_suite_plugin.py: `dynamic` is transformers' own DynamicCache (the
baseline, same run), any other entry a kvcache policy string that the default cache of
`generate()` and of the model's forward becomes (`kvcache.hf.PolicyCache`). Offline: a test
that needs the Hub is reported as skipped.

transformers' tests are not part of its wheel; give a checkout of them, at the installed
version where possible:

    git clone --depth 1 --branch v5.24.0 https://github.com/huggingface/transformers /tmp/transformers
    pip install parameterized==0.9.0
    python benchmarks/hf_transformers_suite.py --transformers-src /tmp/transformers

Prints a table (test, and pass / FAIL / skip per policy), then each failure's first line, and
writes a record to benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from tempfile import TemporaryDirectory

from kvcache.bench import record
from kvcache.bench.common import run_main
from kvcache.errors import KVCacheError

HERE = Path(__file__).resolve().parent
BASELINE = "dynamic"
# the baseline; exact policies (nothing evicted in these short tests, nothing rounded); inexact ones
DEFAULT_POLICIES = (BASELINE, "full", "window:size=4096", "quantized:bits=8,group_size=16,residual=4",
                    "window:size=4", "sinks:n_sink=2,window=4")
CELL = {"passed": "pass", "failed": "FAIL", "error": "ERROR", "skipped": "skip"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="transformers' generation tests on kvcache.hf caches.")
    p.add_argument("--transformers-src", required=True,
                   help="a checkout of transformers holding tests/generation/test_utils.py")
    p.add_argument("--policies", default=";".join(DEFAULT_POLICIES), type=lambda s: s.split(";"),
                   help="';'-separated kvcache policy strings ('dynamic': transformers' DynamicCache); "
                        f"default {';'.join(DEFAULT_POLICIES)}")
    p.add_argument("-k", dest="keyword", default=None, help="pytest -k expression to run fewer tests")
    p.add_argument("--timeout", type=int, default=300, help="seconds per test (default 300)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    record.add_arguments(p)
    args = p.parse_args(argv)
    src = Path(args.transformers_src)
    if not (src / "tests" / "generation" / "test_utils.py").is_file():
        p.error(f"--transformers-src {src}: no tests/generation/test_utils.py there (a checkout of transformers' "
                "repository is needed, not the installed package)")
    if BASELINE not in args.policies:
        args.policies.insert(0, BASELINE)
    if args.threads < 1 or args.timeout < 1:
        p.error("--threads and --timeout must be at least 1")
    args.record_folder = record.parse_folder(p, args)
    return args


def checkout_version(src: Path) -> str | None:
    """transformers' version as the checkout spells it (None when it does not say)."""
    init = src / "src" / "transformers" / "__init__.py"
    found = re.search(r'^__version__ = "([^"]+)"', init.read_text(), re.M) if init.is_file() else None
    return found.group(1) if found else None


def run_policy(policy: str, args, out_dir: Path) -> tuple[dict, float]:
    """One pytest process with `policy`: {test name: (outcome, first line of the reason)}, wall seconds."""
    xml = out_dir / f"{len(list(out_dir.iterdir()))}.xml"
    cmd = [sys.executable, "-m", "pytest", str(HERE / "hf_suite_llama.py"), "-p", "hf_suite_plugin",
           "--kv-policy", policy, "--noconftest", "-p", "no:cacheprovider", "-p", "no:logging", "-c", os.devnull,
           "--rootdir", str(HERE), "-q", "-W", "ignore", f"--timeout={args.timeout}", f"--junitxml={xml}"]
    if args.keyword:
        cmd += ["-k", args.keyword]
    src_path = str(Path(record.__file__).resolve().parents[2])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([src_path, str(HERE), str(Path(args.transformers_src).resolve())]))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if not xml.is_file():
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        raise KVCacheError(f"pytest with --kv-policy {policy!r} reported nothing: {' / '.join(tail)}")
    return outcomes(xml), wall


def outcomes(xml: Path) -> dict:
    """{test name: (outcome, reason's first line)} from a JUnit XML report."""
    results = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, reason = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "failed" if tag == "failure" else tag
                reason = first_line(node.get("message") or node.text or "")
                break
        results[case.get("name")] = (outcome, reason)
    return results


def first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:160] if lines else ""


def main(argv: list[str] | None = None) -> dict:
    from kvcache.bench.common import consoles
    import transformers

    args = parse_args(argv)
    console, err = consoles(args.json, width=220)  # full test names and policies
    runs, walls = {}, {}
    with TemporaryDirectory() as tmp:
        for policy in args.policies:
            err.print(f"running transformers' generation tests with {policy} ...")
            runs[policy], walls[policy] = run_policy(policy, args, Path(tmp))
            counts = {o: sum(1 for x, _ in runs[policy].values() if x == o) for o in CELL}
            err.print(f"  {counts} in {walls[policy]:.0f} s")
    names = sorted(set().union(*runs.values()))
    shown = [n for n in names if any(runs[p].get(n, ("skipped",))[0] != "skipped" for p in args.policies)]
    from rich.table import Table

    table = Table(title="transformers' GenerationTesterMixin tests, tiny random Llama")
    table.add_column("test")
    for policy in args.policies:
        table.add_column(policy)
    for name in shown:
        table.add_row(name.removeprefix("test_"), *(CELL[runs[p].get(name, ("skipped", ""))[0]] for p in args.policies))
    console.print(table)
    failures = {p: {n: r for n, (o, r) in runs[p].items() if o in ("failed", "error")} for p in args.policies}
    for policy in args.policies:
        for name, reason in failures[policy].items():
            also = " (fails on the baseline too)" if name in failures[BASELINE] and policy != BASELINE else ""
            console.print(f"{policy}  {name}{also}: {reason}")
    skipped = sorted({r for n, (o, r) in runs[BASELINE].items() if o == "skipped"})
    console.print(f"skipped in every run ({len(names) - len(shown)} tests): " + "; ".join(skipped))
    version = checkout_version(Path(args.transformers_src))
    result = {
        "transformers_installed": transformers.__version__, "transformers_tests_checkout": version,
        "policies": args.policies,
        "counts": {p: {o: sum(1 for x, _ in runs[p].values() if x == o) for o in CELL} for p in args.policies},
        "tests": {n: {p: list(runs[p].get(n, ("skipped", ""))) for p in args.policies} for n in names},
    }
    if version is not None and version != transformers.__version__:
        console.print(f"note: the tests come from transformers {version}, the installed library is "
                      f"{transformers.__version__}")
    if args.json:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
    record.save("hf_transformers_suite", "python benchmarks/hf_transformers_suite.py", argv, args.record_folder,
                threads=args.threads, config=record.config_of(args), results=result,
                timings={p: {"wall_s": walls[p]} for p in args.policies if p != BASELINE},
                baseline_timings={BASELINE: {"wall_s": walls[BASELINE]}})
    return result


if __name__ == "__main__":
    run_main(main)
