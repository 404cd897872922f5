"""guidellm (streaming, concurrent clients) against `kvcache serve`: failed requests, TTFT, ITL.

Starts `kvcache serve` on a free loopback port (the default model and weights, `--threads`),
then runs guidellm 0.8.1 from its own venv (`bash benchmarks/guidellm_setup.sh` makes
.venv-guidellm) with `--streams` concurrent streaming clients for `--seconds` seconds on
synthetic prompts of `--prompt-tokens` tokens and `--output-tokens` output tokens, through
/v1/completions. Reports guidellm's own figures: successful / errored / incomplete requests
(incomplete: still running when the time ran out), TTFT and inter-token latency (median,
p95), output tokens/s; writes our record with guidellm's full JSON report in it.

    bash benchmarks/guidellm_setup.sh
    python benchmarks/bench_guidellm.py --streams 16 --seconds 60
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
from kvcache.bench.serve import free_port
from kvcache.errors import KVCacheError
from kvcache.models.loader import DEFAULT_MODEL

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="guidellm against kvcache serve.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    p.add_argument("--streams", type=int, default=16, help="concurrent streaming clients (default 16)")
    p.add_argument("--seconds", type=int, default=60, help="how long guidellm sends (default 60)")
    p.add_argument("--prompt-tokens", type=int, default=256, help="synthetic prompt tokens (default 256)")
    p.add_argument("--output-tokens", type=int, default=64, help="output tokens per request (default 64)")
    p.add_argument("--threads", type=int, default=2, help="server threads (default 2)")
    p.add_argument("--guidellm", default=str(REPO / ".venv-guidellm" / "bin" / "guidellm"),
                   help="the guidellm command (default .venv-guidellm/bin/guidellm)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    record.add_arguments(p)
    args = p.parse_args(argv)
    require_at_least_one(p, args, ("streams", "seconds", "prompt_tokens", "output_tokens", "threads"))
    if not Path(args.guidellm).is_file():
        p.error(f"{args.guidellm} does not exist; run: bash benchmarks/guidellm_setup.sh")
    args.record_folder = record.parse_folder(p, args)
    return args


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    import httpx

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise KVCacheError(f"kvcache serve exited with code {proc.returncode} before answering.")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise KVCacheError(f"kvcache serve did not answer {url}/health within {timeout_s:.0f} s.")


def stat(metrics: dict, name: str) -> dict:
    s = metrics[name]["successful"]
    return {"median": s["median"], "p95": s["percentiles"]["p95"], "mean": s["mean"], "count": s["count"]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    console, err = consoles(args.json)
    from kvcache.models.loader import load_model

    tokenizer_dir = load_model(args.model, progress=False, quantization="gguf").model_dir
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "kvcache.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--model", args.model, "--threads", str(args.threads)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        err.print(f"starting kvcache serve on {url} ...")
        wait_healthy(url, server)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "guidellm.json"
            cmd = [args.guidellm, "run",
                   "--backend", f"kind=openai_http,target={url},model={args.model}",
                   "--profile", f"kind=concurrent,streams={args.streams}",
                   "--constraint", f"kind=max_duration,seconds={args.seconds}",
                   "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},"
                             f"output_tokens={args.output_tokens}",
                   "--tokenizer", f"kind=huggingface_auto,model={tokenizer_dir}",
                   "--output", f"kind=json,path={out}", "--disable-console-interactive"]
            err.print(f"guidellm: {args.streams} streaming clients for {args.seconds} s ...")
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=args.seconds * 4 + 600)
            if done.returncode != 0 or not out.is_file():
                last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
                raise KVCacheError(f"guidellm failed: {last}")
            report = json.loads(out.read_text())
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    m = report["benchmarks"][0]["metrics"]
    result = {
        "requests": m["request_totals"],
        "ttft_ms": stat(m, "time_to_first_token_ms"),
        "itl_ms": stat(m, "inter_token_latency_ms"),
        "output_tok_s": m["output_tokens_per_second"]["successful"]["mean"],
        "streams": args.streams, "seconds": args.seconds,
    }
    r = result
    console.print(f"guidellm 0.8.1, {args.streams} streaming clients, {args.seconds} s, {args.prompt_tokens}-token "
                  f"prompts, {args.output_tokens} output tokens: {r['requests']['successful']} successful, "
                  f"{r['requests']['errored']} errored, {r['requests']['incomplete']} incomplete at the end; "
                  f"TTFT median {r['ttft_ms']['median']:.0f} ms (p95 {r['ttft_ms']['p95']:.0f}), ITL median "
                  f"{r['itl_ms']['median']:.1f} ms (p95 {r['itl_ms']['p95']:.1f}), {r['output_tok_s']:.0f} output tok/s")
    if args.json:
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
    record.save("bench_guidellm", "python benchmarks/bench_guidellm.py", argv, args.record_folder,
                threads=args.threads, config=record.config_of(args),
                results={**result, "guidellm_report": report}, timings={"ttft_ms": r["ttft_ms"], "itl_ms": r["itl_ms"]},
                baseline_timings={})
    return result


if __name__ == "__main__":
    run_main(main)
