"""The `kvcache` command: generate, chat, serve, memory, bench, eval.

Bad input prints one sentence to stderr and exits with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from kvcache.bench import record
from kvcache.cli_paths import check_output_dir, check_output_file, os_error_sentence
from kvcache.engine.length_rule import check_length
from kvcache.errors import KVCacheError
from kvcache.replicas.routing import ROUTING

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one sentence, exit 2 (argparse's own convention)
        print(f"error: {message}; see '{self.prog} --help'.", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_count = _int_at_least(0, "an integer >= 0")


def _model_options(p: argparse.ArgumentParser) -> None:
    from kvcache.models.loader import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="model name, .gguf file, HF folder or hub id")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--max-model-len", type=_positive_int, default=None, help="context limit (default: the model's)")
    p.add_argument("--truncation", default="error", choices=["error", "left"], help="prompt longer than the limit")
    p.add_argument("--kernels", default="auto", choices=["auto", "torch", "onednn", "native"],
                   help="matmul kernels (auto: oneDNN for bf16 on CPU, native for fp32 on CPU, torch otherwise)")
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "gguf", "int8", "int4"],
                   help="weights: gguf keeps a GGUF's quantized formats, int8/int4 quantize at load, none is float "
                        "(auto: gguf for a quantized GGUF on the CPU in float32/bfloat16, else none; "
                        "`kvcache eval`: none, the weights its baselines run)")
    p.add_argument("--kv-policy", default=None,
                   help="KV cache policy, e.g. window:size=1024, sinks:n_sink=4,window=1020, "
                        "quantized:bits=4,residual=128, evict:scorer=snapkv,ratio=0.5, tiered:hot=256; "
                        "compose with + (default: keep everything exactly)")


def _tier_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-tier", default=None, metavar="URL",
                   help="share full KV blocks with other engines: redis://HOST:PORT or disk:PATH (written through "
                        "asynchronously, fetched on a prefix-cache miss)")
    p.add_argument("--kv-tier-timeout-ms", type=_positive_int, default=250,
                   help="time bound of a tier lookup; slower is a miss (default 250)")
    p.add_argument("--kv-tier-max-bytes", default=None, help="disk tier size bound, LRU (e.g. 20GiB; default none)")
    p.add_argument("--kv-tier-queue", type=_positive_int, default=256,
                   help="blocks waiting to be written; when full, writes are dropped and counted (default 256)")


def _sampling_options(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=_positive_int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=_count, default=0, help="0 = off (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _solo_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solo", action="store_true",
                   help="one user, no torch: a GGUF's Q8_0/Q4_0/Q4_1 weights through the native kernels alone "
                        "(the least memory; float32 on the CPU, K/V kept exactly)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvcache", description="An LLM inference engine built around an explicit KV cache.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="complete a prompt")
    g.add_argument("--prompt", required=True)
    g.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    g.add_argument("--json", action="store_true", help="print the output and metrics as JSON")
    _model_options(g)
    _tier_options(g)
    _sampling_options(g, 64)
    _solo_option(g)

    c = sub.add_parser("chat", help="chat with the model (interactive, or one shot with --message)")
    c.add_argument("--message", default=None, help="send one message, print the reply, exit")
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--overflow", default="truncate", choices=["truncate", "summarize", "error"],
                   help="when the history passes --max-history-tokens (default: the context)")
    c.add_argument("--max-history-tokens", type=_positive_int, default=None)
    _model_options(c)
    _tier_options(c)
    _sampling_options(c, 256)
    _solo_option(c)

    c.add_argument("--sessions-dir", default=None, help="where /save and /load keep sessions "
                   "(default ~/.cache/kvcache/sessions)")

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (loopback by default)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=_positive_int, default=8000)
    s.add_argument("--kv-cache-memory", default="2GiB", help="KV block pool size, committed at start (default 2GiB)")
    s.add_argument("--api-key", default=os.environ.get("KVCACHE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default $KVCACHE_API_KEY)")
    s.add_argument("--max-queue", type=_count, default=256,
                   help="requests that may wait beyond the running batch; more get 429 (default 256)")
    s.add_argument("--max-num-seqs", type=_positive_int, default=64, help="requests decoded together (default 64)")
    s.add_argument("--served-model-name", default=None, help="model id clients use (default: --model)")
    s.add_argument("--sessions-dir", default=None, help="saved sessions folder (default ~/.cache/kvcache/sessions)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--replicas", type=_positive_int, default=None,
                   help="serve N engine replicas on Ray Serve behind one ingress (default: one engine, no Ray); "
                        "--threads is per replica")
    s.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --replicas: join this Ray cluster (e.g. HEAD:6379) instead of starting a local one")
    s.add_argument("--routing", default=None, choices=list(ROUTING),
                   help="with --replicas: prefix (the replica holding the prompt's longest run of cached blocks; "
                        "default), round-robin or least-loaded")
    s.add_argument("--routing-imbalance", type=_count, default=None, metavar="N",
                   help="with --routing prefix: go to the least loaded replica when the prefix holder has more than "
                        "N more requests in flight (default 8)")
    _model_options(s)
    _tier_options(s)

    m = sub.add_parser("memory", help="KV cache memory calculator")
    m.add_argument("model", help="preset (e.g. llama-2-7b), config.json, .gguf or any model name")
    m.add_argument("--seq-len", type=_positive_int, default=1024)
    m.add_argument("--batch", type=_positive_int, default=1)
    m.add_argument("--dtype", default="fp16", help="fp32 | fp16 | bf16 | int8 | int4 | int2")
    m.add_argument("--group-size", type=_positive_int, default=64, help="values per scale/zero point (int formats)")
    m.add_argument("--budget", default=None, help="memory budget, e.g. 8GiB")
    m.add_argument("--block-size", type=_positive_int, default=16, help="tokens per paged block")
    m.add_argument("--weights", default="auto", choices=["auto", "none", "int8", "int4", "gguf"],
                   help="weights sharing --budget with the KV cache (default auto: what LLM picks in the KV "
                        "dtype, gguf for a GGUF it keeps packed, else none)")
    m.add_argument("--json", action="store_true")

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    bc = bsub.add_parser("cache", help="cached vs uncached decode step by position")
    bc.add_argument("--positions", default="128,256,512,1024")
    bc.add_argument("--repeats", type=_positive_int, default=20)
    bc.add_argument("--prompt-tokens", type=_positive_int, default=128, help="end-to-end run: prompt length")
    bc.add_argument("--new-tokens", type=_positive_int, default=64, help="end-to-end run: tokens generated")
    bc.add_argument("--json", action="store_true")
    bc.add_argument("--plot", default=None, help="write a PNG here")
    _model_options(bc)
    record.add_arguments(bc)
    bh = bsub.add_parser("chat", help="time to first token of a late chat turn: session cache vs recompute")
    bh.add_argument("--turns", type=_positive_int, default=5)
    bh.add_argument("--words", type=_positive_int, default=150, help="words per user message")
    bh.add_argument("--reply-tokens", type=_positive_int, default=32)
    bh.add_argument("--repeats", type=_positive_int, default=3)
    bh.add_argument("--json", action="store_true")
    _model_options(bh)
    record.add_arguments(bh)

    e = sub.add_parser("eval", help="evaluate KV policies: perplexity, needle, decode speed, compression")
    e.add_argument("--policies", default=None,
                   help="policies separated by ';' (default: full, quantized 8/4/2, window, sinks, evict "
                        "h2o/snapkv/knorm at 0.5/0.75/0.875, tiered, sinks+quantized)")
    e.add_argument("--contexts", default="1024,2048,4096", help="perplexity contexts, tokens")
    e.add_argument("--needle-lengths", default="1024,4096", help="needle context lengths, tokens")
    e.add_argument("--needle-depths", default="0.25,0.75", help="needle depths, fractions of the context")
    e.add_argument("--speed-context", type=_positive_int, default=4096, help="decode speed after this many tokens")
    e.add_argument("--speed-steps", type=_positive_int, default=16, help="decode steps per timed repeat")
    e.add_argument("--speed-repeats", type=_positive_int, default=3)
    e.add_argument("--skip-speed", action="store_true")
    e.add_argument("--skip-needle", action="store_true")
    e.add_argument("--baselines", default="hf,kvpress", help="hf, kvpress, both, or none")
    e.add_argument("--kvpress-python", default=None, help="python of a venv with kvpress (runs its driver)")
    e.add_argument("--kvpress-presses", default="snapkv,knorm")
    e.add_argument("--chunk", type=_positive_int, default=32, help="prefill chunk of the perplexity pass")
    e.add_argument("--seed", type=int, default=0, help="needle cases")
    e.add_argument("--stream-tokens", type=_positive_int, default=None,
                   help="run the streaming check instead: this many tokens through --stream-policies")
    e.add_argument("--stream-policies", default=None,
                   help="default 'sinks:n_sink=4,window=1020;sinks:n_sink=0,window=1024'")
    e.add_argument("--out", default="out/eval", help="folder for results.md, plots, cases and JSON")
    e.add_argument("--no-plots", action="store_true")
    e.add_argument("--json", action="store_true", help="print the rows as a JSON list (the table goes to stderr)")
    _model_options(e)
    record.add_arguments(e)
    return parser


def _llm_kwargs(args, **engine) -> dict:
    """`LLM(**kwargs)` for the model, tier and engine flags."""
    if getattr(args, "kv_tier", None) is not None:
        engine.update(kv_tier=args.kv_tier, kv_tier_timeout_ms=args.kv_tier_timeout_ms,
                      kv_tier_max_bytes=args.kv_tier_max_bytes, kv_tier_queue=args.kv_tier_queue)
    elif getattr(args, "kv_tier_max_bytes", None) is not None:
        raise KVCacheError("--kv-tier-max-bytes bounds a tier; give --kv-tier disk:PATH too.")
    return dict(model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                truncation=args.truncation,
                threads=args.threads, kernels=args.kernels, kv_policy=args.kv_policy,
                quantization=args.quantization, **engine)


def _make_llm(args, **engine):
    from kvcache import LLM

    return LLM(**_llm_kwargs(args, **engine))


def _params(args):
    """Sampling flags, checked before the model loads (against --max-model-len when given)."""
    from kvcache.engine.sampling_params import SamplingParams

    if args.max_model_len is not None:
        check_length(args.max_tokens, args.max_model_len)
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop=args.stop)


def cmd_generate(args) -> int:
    params = _params(args)
    if args.solo:
        from kvcache.cli_solo import generate

        return generate(args, params)
    llm = _make_llm(args)
    if args.json:
        out = llm.generate([args.prompt], params, use_cache=not args.no_cache)[0]
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                          "metrics": out.metrics.to_dict()}))
        return 0
    for piece in llm.stream(args.prompt, params, use_cache=not args.no_cache):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    params = _params(args)
    if args.solo:
        from kvcache.cli_solo import chat

        return chat(args, params)
    from kvcache.cli_chat import one_shot, repl

    llm = _make_llm(args)
    check_length(args.max_tokens, llm.max_model_len)  # before the first message, not at it
    session = llm.session(system=args.system, overflow=args.overflow, max_history_tokens=args.max_history_tokens)
    if args.message is not None:
        return one_shot(session, args.message, params)
    return repl(session, params, args.sessions_dir)


def cmd_serve(args) -> int:
    from kvcache.server import ServerConfig, serve

    if not 1 <= args.port <= 65535:
        raise KVCacheError(f"--port must be in 1..65535, got {args.port}.")
    if args.sessions_dir is not None:
        check_output_dir(args.sessions_dir, "--sessions-dir")
    config = ServerConfig(model_name=args.served_model_name or args.model, api_key=args.api_key,
                          max_queue=args.max_queue, sessions_dir=args.sessions_dir)
    if args.replicas is None:
        given = [f for f, v in (("--ray-address", args.ray_address), ("--routing", args.routing),
                                ("--routing-imbalance", args.routing_imbalance)) if v is not None]
        if given:
            raise KVCacheError(f"{given[0]} applies to replicas; give --replicas N too.")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api-key; anyone who can reach it can use it.",
              file=sys.stderr)
    engine = dict(kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs)
    if args.replicas is not None:
        return _serve_replicas(args, config, _llm_kwargs(args, progress=False, **engine))
    llm = _make_llm(args, **engine)
    serve(llm, config, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _serve_replicas(args, config, llm_kwargs: dict) -> int:
    """`serve --replicas N`: the engines on Ray Serve (imported only here)."""
    import dataclasses

    try:
        from kvcache.replicas.launch import ClusterOptions, run
        from kvcache.replicas.replica import ReplicaSpec
    except ImportError as exc:
        raise KVCacheError(f"--replicas needs Ray Serve ({exc}); install it with pip install 'kvcache[serve]'.") \
            from None
    from kvcache.cache.policies.grammar import parse_policy

    parse_policy(args.kv_policy)  # a bad policy is refused here, before any replica starts
    spec = ReplicaSpec(llm=llm_kwargs, server=dataclasses.replace(config, api_key=None))
    run(ClusterOptions(replicas=args.replicas, spec=spec, server=config, routing=args.routing or "prefix",
                       imbalance=8 if args.routing_imbalance is None else args.routing_imbalance,
                       cpus_per_replica=args.threads or 1, host=args.host, port=args.port), address=args.ray_address)
    return 0


def cmd_memory(args) -> int:
    from kvcache.cache import spec

    fmt = spec.KVFormat.parse(args.dtype, group_size=args.group_size)
    budget = spec.parse_size(args.budget) if args.budget else None
    shape = spec.model_shape(args.model)
    gguf = spec.model_gguf(args.model)
    float_dtype = spec.weights_float_dtype(fmt)
    weights = spec.weights_by_quantization(shape, float_dtype, gguf)
    quantization = spec.auto_weights(gguf, fmt) if args.weights == "auto" else args.weights
    if args.weights != "auto":  # asked for: these weights must be known and fit the budget
        if quantization == "gguf" and gguf is None:
            raise KVCacheError(f"--weights gguf counts a GGUF file's own formats, and {args.model} is not a GGUF file.")
        w = spec.weights_bytes(shape, quantization, float_dtype, gguf)  # raises where n/a
        if budget is not None and w > budget:
            what = f"none ({float_dtype})" if quantization == "none" else quantization
            raise KVCacheError(f"The {what} weights of {args.model} take {spec.format_bytes(w)} ({w:,} bytes), "
                               f"more than the {spec.format_bytes(budget)} budget; give a larger --budget or "
                               "smaller --weights.")
    report = spec.memory_report(shape, fmt, seq_len=args.seq_len, batch=args.batch, budget_bytes=budget,
                                block_size=args.block_size, weights=weights, weights_quantization=quantization)
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    from rich.console import Console

    from kvcache.cache.memory_table import render_memory_report

    Console().print(render_memory_report(report))
    return 0


def cmd_bench(args) -> int:
    if args.bench == "chat":
        return cmd_bench_chat(args)
    from kvcache.bench import cache_bench

    try:
        positions = [int(x) for x in args.positions.split(",") if x.strip()]
    except ValueError:
        raise KVCacheError(f"--positions must be comma-separated integers, got '{args.positions}'.") from None
    if not positions or min(positions) < 1:
        raise KVCacheError("--positions needs at least one position >= 1.")
    records = record.folder_from_args(args)
    if args.plot:
        check_output_file(args.plot, "--plot")
    llm = _make_llm(args)
    if max(positions) + 1 > llm.max_model_len:
        raise KVCacheError(f"Position {max(positions)} is past max_model_len {llm.max_model_len}.")
    check_length(args.new_tokens, llm.max_model_len, args.prompt_tokens)  # the end-to-end run
    points, e2e = cache_bench.run(llm, positions, args.repeats, args.prompt_tokens, args.new_tokens,
                                  progress=not args.json)
    if args.plot:
        cache_bench.plot(points, args.plot, f"{llm.name} ({args.dtype}): KV cache vs full recompute")
    if args.json:
        print(json.dumps(cache_bench.to_json(points)))
        _save_record(args, "bench_cache", records, **cache_bench.record_fields(points, e2e))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"KV cache vs recompute, {llm.name}, {args.dtype}, median of {args.repeats}")
    for col in ("position", "cached ms/token", "uncached ms/token", "speedup"):
        t.add_column(col, justify="right")
    for p in points:
        t.add_row(str(p.position), f"{p.cached_ms:.2f}", f"{p.uncached_ms:.1f}", f"{p.speedup:.1f}x")
    console = Console()
    console.print(t)
    console.print(
        f"end to end ({e2e.prompt_tokens}-token prompt, {e2e.new_tokens} new tokens): "
        f"{e2e.cached_tok_s:.1f} tok/s with cache, {e2e.uncached_tok_s:.1f} tok/s without ({e2e.speedup:.1f}x)"
    )
    if args.plot:
        console.print(f"plot written to {args.plot}")
    _save_record(args, "bench_cache", records, **cache_bench.record_fields(points, e2e))
    return 0


def cmd_bench_chat(args) -> int:
    from kvcache.bench import chat_bench

    if args.turns < 2:
        raise KVCacheError("--turns must be at least 2 so that there is a history to reuse.")
    records = record.folder_from_args(args)
    llm = _make_llm(args)
    check_length(args.reply_tokens, llm.max_model_len)
    r = chat_bench.run(llm, args.turns, args.words, args.reply_tokens, args.repeats)
    if args.json:
        print(json.dumps(chat_bench.to_json(r)))
        _save_record(args, "bench_chat", records, **chat_bench.record_fields(r))
        return 0
    print(f"turn {r.turn}: {r.history_tokens} prompt tokens, {r.cached_prompt_tokens} reused from the session cache")
    print(f"time to first token: session {r.session_ttft_ms:.0f} ms, recompute {r.recompute_ttft_ms:.0f} ms "
          f"-> {r.speedup:.1f}x faster (median of {args.repeats}); same reply: {r.same_reply}")
    _save_record(args, "bench_chat", records, **chat_bench.record_fields(r))
    return 0


def _save_record(args, benchmark: str, folder, **fields) -> None:
    """The run's JSON record (kvcache.bench.record), after its results are shown."""
    import torch

    config = {k: v for k, v in vars(args).items() if k != "argv"}
    record.save(benchmark, "kvcache", args.argv, folder, threads=torch.get_num_threads(), config=config, **fields)


def cmd_eval(args) -> int:
    from kvcache.cli_eval import run

    if args.quantization == "auto":  # the transformers and kvpress baselines run float weights
        args.quantization = "none"
    return run(args, _make_llm, _save_record)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "memory": cmd_memory, "bench": cmd_bench,
            "serve": cmd_serve, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for benchmark records
    if getattr(args, "device", None) is not None and args.dtype is None:  # a command that loads a model
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    try:
        return COMMANDS[args.command](args)
    except KVCacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a path that cannot be read or written: one sentence, no traceback
        print(f"error: {os_error_sentence(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
