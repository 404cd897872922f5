"""lm-evaluation-harness against `kvcache serve`, checked against lm-eval's own `hf` backend.

Workload: the task in kvcache_mc.yaml (20 multiple-choice items written for this repository,
10 ARC-style questions and 10 HellaSwag-style continuations; no dataset download), scored by
lm-eval (0.4.13, the `eval` extra) twice on the same float32 weights:

- `local-completions` against `kvcache serve --quantization none --dtype float32` (started
  here as a subprocess): each choice's loglikelihood comes from the prompt's own logprobs
  (`echo` with `logprobs`), 4 prompts per request (`--batch_size 4`);
- `hf`: lm-eval runs transformers on the same HF folder in this process.

Reported: both loglikelihoods of every (item, choice), the largest |difference|, and acc /
acc_norm of each backend. The run fails (exit 1) when a difference exceeds `--tolerance`
(default 1e-3) or the accuracies differ.

    python benchmarks/lm_eval/run_lm_eval.py                    # the measured run, writes a record
    python benchmarks/lm_eval/run_lm_eval.py --limit 4 --no-record   # a quick check

The same through lm-eval's own CLI against a running server: README.md in this folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib.util import find_spec
from pathlib import Path

from rich.console import Console

from kvcache.bench.serve import ServeProcess
from kvcache.errors import KVCacheError

HERE = Path(__file__).resolve().parent
TASK = "kvcache_mc"
TASK_YAML = HERE / f"{TASK}.yaml"
TASK_DATA = HERE / f"{TASK}.jsonl"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def write_task(folder: Path) -> Path:
    """The repository's task YAML, copied into `folder` with its data file as an absolute path
    and the dataset cache inside `folder`, so it runs from any working directory; returns `folder`."""
    import yaml

    config = yaml.safe_load(TASK_YAML.read_text())
    config["dataset_kwargs"] = {"data_files": {"test": str(TASK_DATA)}, "cache_dir": str(folder / "datasets")}
    (folder / TASK_YAML.name).write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def evaluate(model: str, model_args: dict, include_path: Path, limit: int | None, batch_size: int = 4) -> dict:
    """One lm-eval run of the task: {"acc", "acc_norm", "logliks": {doc_id: [loglik per choice]}}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], limit=limit,
                                  batch_size=batch_size, log_samples=True,
                                  task_manager=TaskManager(include_path=str(include_path)))
    metrics = out["results"][TASK]
    logliks = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in out["samples"][TASK]}
    return {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"], "logliks": logliks}


def server_model_args(base_url: str, model_id: str, tokenizer_dir: str) -> dict:
    """`local-completions` arguments: our server's completions endpoint, the local tokenizer."""
    return {"base_url": f"{base_url}/v1/completions", "model": model_id, "tokenizer": tokenizer_dir,
            "tokenizer_backend": "huggingface", "max_retries": 1}


def hf_model_args(model_dir: str) -> dict:
    return {"pretrained": model_dir, "dtype": "float32", "device": "cpu"}


def compare(server: dict, hf: dict) -> dict:
    """Per (item, choice) |difference| of the two runs' loglikelihoods, and their accuracies."""
    if server["logliks"].keys() != hf["logliks"].keys():
        raise ValueError("the two runs scored different items")
    rows = []
    for doc in sorted(hf["logliks"]):
        for choice, (a, b) in enumerate(zip(server["logliks"][doc], hf["logliks"][doc], strict=True)):
            rows.append({"doc": doc, "choice": choice, "server": a, "hf": b, "abs_diff": abs(a - b)})
    return {"items": len(hf["logliks"]), "choices": len(rows), "max_abs_diff": max(r["abs_diff"] for r in rows),
            "server_acc": server["acc"], "hf_acc": hf["acc"],
            "server_acc_norm": server["acc_norm"], "hf_acc_norm": hf["acc_norm"], "rows": rows}


def server_args(model_dir: str, threads: int) -> list[str]:
    """`kvcache serve` options: float32 weights, as lm-eval's `hf` backend runs them."""
    return ["--model", model_dir, "--quantization", "none", "--dtype", "float32", "--threads", str(threads),
            "--kv-cache-memory", "256MiB", "--log-level", "warning"]


def table(result: dict) -> str:
    lines = [f"{'item':>4} {'choice':>6} {'server':>12} {'hf':>12} {'|diff|':>9}"]
    for r in result["rows"]:
        lines.append(f"{r['doc']:>4} {r['choice']:>6} {r['server']:>12.5f} {r['hf']:>12.5f} {r['abs_diff']:>9.2e}")
    lines.append(f"max |loglik difference| {result['max_abs_diff']:.2e} over {result['choices']} choices "
                 f"of {result['items']} items")
    lines.append(f"acc: server {result['server_acc']:.3f}, hf {result['hf_acc']:.3f}; "
                 f"acc_norm: server {result['server_acc_norm']:.3f}, hf {result['hf_acc_norm']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from kvcache.bench import record
    from kvcache.models.loader import DEFAULT_MODEL, resolve_model_dir

    p = argparse.ArgumentParser(description="lm-eval on kvcache serve vs lm-eval's hf backend, same weights.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or HF folder (default {DEFAULT_MODEL})")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items (default all 20)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, server and hf (default 2)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest |loglik difference| allowed (default 1e-3)")
    record.add_arguments(p)
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    if find_spec("lm_eval") is None:
        p.error("lm-eval is not installed (pip install -e '.[eval]')")
    folder = record.parse_folder(p, args)
    os.environ.update(OFFLINE_ENV)
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    model_dir = str(resolve_model_dir(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        include = write_task(Path(tmp))
        with ServeProcess(server_args(model_dir, args.threads), Console(stderr=True), "kvcache serve") as server:
            t0 = time.perf_counter()
            ours = evaluate("local-completions", server_model_args(server.url, model_dir, model_dir), include,
                            args.limit)
            server_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs = evaluate("hf", hf_model_args(model_dir), include, args.limit)
        hf_s = time.perf_counter() - t0
    result = compare(ours, theirs)
    result["passed"] = result["max_abs_diff"] <= args.tolerance and result["server_acc"] == result["hf_acc"] \
        and result["server_acc_norm"] == result["hf_acc_norm"]
    print(table(result))
    print("PASS" if result["passed"] else "FAIL")
    import lm_eval

    record.save("lm_eval_vs_hf", "python benchmarks/lm_eval/run_lm_eval.py", argv, folder, threads=args.threads,
                config={"model": args.model, "model_dir": model_dir, "limit": args.limit, "tolerance": args.tolerance,
                        "batch_size": 4, "dtype": "float32", "quantization": "none",
                        "lm_eval": lm_eval.__version__},
                timings={"server_eval_s": server_s}, baseline_timings={"hf_eval_s": hf_s}, results=result)
    return result


if __name__ == "__main__":
    try:
        sys.exit(0 if main()["passed"] else 1)
    except KVCacheError as exc:
        sys.exit(f"error: {exc}")
