"""`kvcache eval`: flags -> a `SweepConfig` (or the streaming check), progress, tables, plots, JSON."""

from __future__ import annotations

import json
from pathlib import Path

from kvcache.cli_paths import check_output_dir, prepare_output_dir
from kvcache.errors import KVCacheError
from kvcache.eval import sweep
from kvcache.eval.sweep import SweepConfig, parse_list

BASELINES = ("hf", "kvpress")


def _policies(text: str | None, default) -> list[str]:
    if text is None:
        return list(default)
    policies = [p.strip() for p in text.split(";") if p.strip()]
    if not policies:
        raise KVCacheError("--policies needs at least one policy (separate them with ';').")
    return policies


def _baselines(text: str) -> tuple[str, ...]:
    names = [b.strip().lower() for b in text.split(",") if b.strip()]
    if names in (["none"], []):
        return ()
    if names == ["both"]:
        return BASELINES
    bad = [b for b in names if b not in BASELINES]
    if bad:
        raise KVCacheError(f"Unknown baseline '{bad[0]}'; use {', '.join(BASELINES)}, both or none.")
    return tuple(names)


def config_from_args(args) -> SweepConfig:
    """Everything checkable without the model; a mistake is one sentence."""
    cfg = SweepConfig(
        policies=_policies(args.policies, sweep.DEFAULT_POLICIES),
        contexts=parse_list(args.contexts, int, "--contexts"),
        needle_lengths=parse_list(args.needle_lengths, int, "--needle-lengths"),
        needle_depths=parse_list(args.needle_depths, float, "--needle-depths"),
        speed_context=args.speed_context, speed_steps=args.speed_steps, speed_repeats=args.speed_repeats,
        skip_speed=args.skip_speed, skip_needle=args.skip_needle, baselines=_baselines(args.baselines),
        kvpress_python=args.kvpress_python,
        kvpress_presses=tuple(p.strip() for p in args.kvpress_presses.split(",") if p.strip()),
        chunk=args.chunk, seed=args.seed, out_dir=args.out)
    if "kvpress" in cfg.baselines and cfg.kvpress_python and not Path(cfg.kvpress_python).is_file():
        raise KVCacheError(f"--kvpress-python {cfg.kvpress_python} is not a file (give the python of a venv with "
                           "kvpress).")
    if min(cfg.contexts) < 2:
        raise KVCacheError("--contexts must be at least 2 tokens each.")
    if min(cfg.speed_context, cfg.speed_steps, cfg.speed_repeats, cfg.chunk) < 1:
        raise KVCacheError("--speed-context, --speed-steps, --speed-repeats and --chunk must be positive.")
    if not cfg.skip_needle:
        if min(cfg.needle_lengths) < 64:
            raise KVCacheError("--needle-lengths must be at least 64 tokens each.")
        if not all(0.0 <= d <= 1.0 for d in cfg.needle_depths):
            raise KVCacheError("--needle-depths must be fractions between 0 and 1.")
    from kvcache.cache.policies.grammar import parse_policy

    for p in cfg.policies:
        parse_policy(p)
    return cfg


def _fit_policies(llm, cfg: SweepConfig, named: bool, log) -> None:
    """Policies whose layer lists (hi_keys / hi_values) name layers this model lacks: an error
    before any work when the user named them, dropped with a notice from the default rows."""
    from kvcache.cache.policies.grammar import parse_policy
    from kvcache.cache.policies.quantized_store import layer_bits

    kept = []
    for p in cfg.policies:
        store = parse_policy(p).store
        try:
            if store.name in ("quantized", "tiered"):
                layer_bits(store, llm.config.num_layers)
        except KVCacheError as exc:
            if named:
                raise
            log(f"skipping default policy '{p}': {exc}")
            continue
        kept.append(p)
    cfg.policies = kept


def _check_lengths(llm, cfg: SweepConfig) -> None:
    longest = max(cfg.contexts + ([] if cfg.skip_needle else [n + 64 for n in cfg.needle_lengths])
                  + ([] if cfg.skip_speed else [cfg.speed_context + 64]))
    if longest > llm.max_model_len:
        raise KVCacheError(f"A context of {longest} tokens (with the needle prompt or decode steps) is past "
                           f"max_model_len {llm.max_model_len}.")


def _progress(err, enabled: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True, disable=not enabled)


def record_fields(rows) -> dict:
    """The benchmark record's parts: every row's decode repeats (ours per policy; the baselines'
    transformers rows), and every row in full."""
    return {"timings": {r.policy: {"decode_tok_s": r.decode_tok_s_runs} for r in rows if r.kind == "policy"},
            "baseline_timings": {r.policy: {"decode_tok_s": r.decode_tok_s_runs} for r in rows if r.kind == "hf"},
            "results": [r.to_dict() for r in rows]}


def run(args, make_llm, save_record=None) -> int:
    """`save_record(args, benchmark, folder, **fields)` writes the run's record (kvcache.cli's)."""
    from kvcache.bench import record
    from kvcache.bench.common import consoles

    out, err = consoles(args.json)
    if args.stream_tokens is not None:
        return run_stream(args, make_llm, out, err, save_record)
    cfg = config_from_args(args)
    check_output_dir(cfg.out_dir, "--out")
    llm = make_llm(args)
    _check_lengths(llm, cfg)
    _fit_policies(llm, cfg, named=args.policies is not None, log=err.print)
    records = record.folder_from_args(args) if save_record else None
    folder = prepare_output_dir(cfg.out_dir, "--out")  # the sweep's results must have somewhere to go
    with _progress(err, err.is_terminal) as bar:
        rows = sweep.run_sweep(llm, cfg, bar, log=lambda msg: err.print(msg, markup=False, highlight=False))
    title = (f"{llm.name}, {args.dtype}: perplexity over the first {max(cfg.contexts)} corpus tokens "
             f"(chunks of {cfg.chunk})")
    from kvcache.eval import report

    header = (f"# kvcache eval: {llm.name} ({args.dtype})\n\ncontexts {cfg.contexts}; needle lengths "
              f"{cfg.needle_lengths} x depths {cfg.needle_depths}; decode speed after {cfg.speed_context} tokens, "
              f"median of {cfg.speed_repeats} x {cfg.speed_steps} steps. Memory at the end of the "
              f"{max(cfg.contexts)}-token pass.")
    paths = [report.write_markdown(folder / "results.md", rows, cfg.contexts, header)]
    (folder / "results.json").write_text(json.dumps([r.to_dict() for r in rows], indent=1))
    paths.append(folder / "results.json")
    if not args.no_plots:
        paths.append(report.plot_perplexity(folder / "perplexity.png", rows, max(cfg.contexts), title))
        if not cfg.skip_needle:
            paths.append(report.plot_needle(folder / "needle.png", rows, f"{llm.name}: needle accuracy over "
                                            f"{len(cfg.needle_lengths) * len(cfg.needle_depths)} cases"))
    if args.json:
        print(json.dumps([r.to_dict() for r in rows]))
    out.print(report.terminal_table(rows, cfg.contexts, f"kvcache eval: {llm.name} ({args.dtype})"))
    out.print("written: " + ", ".join(map(str, paths)), markup=False, highlight=False)
    if save_record:
        save_record(args, "eval", records, **record_fields(rows))
    return 0


def run_stream(args, make_llm, out, err, save_record=None) -> int:
    from kvcache.bench import record
    from kvcache.cache.policies.grammar import parse_policy
    from kvcache.cache.spec import format_bytes
    from kvcache.eval.stream import DEFAULT_STREAM_POLICIES, plot_stream
    from kvcache.eval.stream import run_stream as stream_one

    policies = _policies(args.stream_policies, DEFAULT_STREAM_POLICIES)
    for p in policies:
        parse_policy(p)
    n = args.stream_tokens
    edge = min(1000, n // 4)
    if edge < 2:
        raise KVCacheError("--stream-tokens must be at least 8.")
    check_output_dir(args.out, "--out")
    llm = make_llm(args)
    records = record.folder_from_args(args) if save_record else None
    folder = prepare_output_dir(args.out, "--out")
    results = []
    with _progress(err, err.is_terminal) as bar:
        for p in policies:
            task = bar.add_task(p, total=n)
            results.append(stream_one(llm, p, n, edge, args.chunk, on_chunk=lambda t, task=task: bar.advance(task, t)))
    (folder / "stream.json").write_text(json.dumps([r.to_dict() for r in results]))
    written = [folder / "stream.json"]
    if not args.no_plots:
        written.append(plot_stream(folder / "stream.png", results, f"{llm.name}: {n} tokens streamed "
                                   f"(chunks of {args.chunk})"))
    if args.json:
        print(json.dumps([{k: v for k, v in r.to_dict().items() if k != "samples"} for r in results]))
    from rich.table import Table

    t = Table(title=f"streaming {n} tokens: first vs last {edge} predictions")
    for col in ("policy", f"ppl first {edge}", f"ppl last {edge}", "KV bytes after fill (min..max)", "KV peak"):
        t.add_column(col, justify="right")
    for r in results:
        lo, hi = r.kv_bytes_after_fill
        t.add_row(r.policy, f"{r.ppl_first:.2f}", f"{r.ppl_last:.2f}", f"{format_bytes(lo)}..{format_bytes(hi)}",
                  format_bytes(r.kv_bytes_max))
    out.print(t)
    out.print("written: " + ", ".join(map(str, written)), markup=False, highlight=False)
    if save_record:  # a quality check: no timings, the figures are in the results
        save_record(args, "eval_stream", records, timings={}, baseline_timings={},
                    results=[r.to_dict() for r in results])
    return 0
