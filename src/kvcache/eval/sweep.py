"""`kvcache eval`: every policy through the same measurements, one row each.

Per policy:
- one perplexity pass over the first max(contexts) corpus tokens (chunks of `chunk`);
  perplexity at context L is exp(mean loss) over its first L tokens. That equals a separate
  L-token run (the cache is causal: what it holds at token i does not depend on later
  tokens), so one pass gives every context. The headline `perplexity` is at the longest.
- memory at the end of that pass: bytes really held (`nbytes_used`), tokens held and seen;
  bytes_per_token = bytes / tokens held, bytes_per_token_seen = bytes / tokens seen,
  compression_ratio = fp16 bytes of the tokens seen / bytes held (a dense fp32 cache is 0.5),
  compression_vs_dense = the same against a dense cache in the model's dtype.
- needle accuracy over the cases of `needle.py`;
- decode tok/s at `speed_context` (continuing the perplexity pass's cache when that context
  is the longest one, else after its own prefill).
Baselines: `transformers` decode speed with DynamicCache and QuantizedCache ("hf"), and the
kvpress driver's needle answers on the very same cases ("kvpress", `kvpress.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvcache.cache.policies.scorers import SCORERS
from kvcache.errors import KVCacheError
from kvcache.eval import kvpress, needle, speed
from kvcache.eval.corpus import corpus_token_ids
from kvcache.eval.perplexity import token_losses

EVICT_RATIOS = (0.5, 0.75, 0.875)  # fraction removed: 2x, 4x, 8x fewer tokens
# Exact tokens of the quantized policies are kept in fp16 (exact=fp16), as the fp16 cache they
# are compared with holds them; `full:dtype=fp16` is that fp16 cache, measured.
DEFAULT_POLICIES = (
    ["full", "full:dtype=fp16",
     "quantized:bits=8,residual=0,exact=fp16",  # llama.cpp q8_0-like: 8.5 bits a value
     "quantized:bits=4,group_size=128,residual=128,exact=fp16",
     "quantized:bits=2,group_size=32,residual=128,n_sink=0,exact=fp16",  # KIVI-2's settings
     "quantized:bits=2,group_size=64,residual=64,n_sink=0,exact=fp16",
     "quantized:bits=2,group_size=64,residual=64,n_sink=4,exact=fp16",  # the attention sinks exact too
     # + the 5 most sensitive layers' keys/values at 4 bits (`python -m kvcache.eval.calibrate`, on the
     # default model's 30 layers; another model needs its own list)
     "quantized:bits=2,group_size=64,residual=32,n_sink=4,exact=fp16,hi_keys=8/17/18/24,hi_values=1",
     # per-token groups, every token quantized as written: what the paged engine (and server) hold
     "quantized:bits=8,key_axis=token,residual=0", "quantized:bits=4,group_size=32,key_axis=token,residual=0",
     "quantized:bits=4,key_bits=8,group_size=32,key_axis=token,residual=0",
     "window:size=1024", "sinks:n_sink=4,window=1020"]
    + [f"evict:scorer={s},ratio={r}" for s in SCORERS for r in EVICT_RATIOS]
    + ["tiered:hot=256,warm_bits=4,warm=1024,cold=disk,exact=fp16",
       "sinks:n_sink=4,window=2044+quantized:bits=8,residual=0,exact=fp16"]
)
FP16_BYTES = 2


@dataclass
class SweepConfig:
    policies: list[str] = field(default_factory=lambda: list(DEFAULT_POLICIES))
    contexts: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    needle_lengths: list[int] = field(default_factory=lambda: [1024, 4096])
    needle_depths: list[float] = field(default_factory=lambda: [0.25, 0.75])
    speed_context: int = 4096
    speed_steps: int = 16
    speed_repeats: int = 3
    skip_speed: bool = False
    skip_needle: bool = False
    baselines: tuple[str, ...] = ("hf", "kvpress")
    kvpress_python: str | None = None
    kvpress_presses: tuple[str, ...] = ("snapkv", "knorm")
    kvpress_ratios: tuple[float, ...] = EVICT_RATIOS
    chunk: int = 32
    needle_chunk: int = 512
    seed: int = 0
    out_dir: str = "out/eval"


@dataclass
class Row:
    """One line of the results: a policy we ran, a derived line, or a baseline."""

    policy: str
    kind: str = "policy"  # policy | derived | hf | kvpress
    tokens_seen: int | None = None
    tokens_held: int | None = None
    kv_bytes: int | None = None
    kv_bytes_peak: int | None = None
    bytes_per_token: float | None = None  # bytes held / tokens held
    bytes_per_token_seen: float | None = None  # bytes held / tokens seen
    compression_ratio: float | None = None  # fp16 bytes of the tokens seen / bytes held
    compression_vs_dense: float | None = None  # the same against the model dtype's dense cache
    perplexity: float | None = None  # at the longest context
    perplexity_by_context: dict[str, float] = field(default_factory=dict)
    needle_accuracy: float | None = None
    needle_by_length: dict[str, float] = field(default_factory=dict)
    needle_answers: list[dict] = field(default_factory=list)
    decode_tok_s: float | None = None
    decode_tok_s_runs: list[float] = field(default_factory=list)  # every timed repeat
    decode_context: int | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def dense_bytes_per_token(llm, element_bytes: int) -> int:
    c = llm.config
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * element_bytes


def check_policies(llm, policies: list[str]) -> None:
    """Build every policy's cache once, so a bad policy is an error before any work."""
    for p in policies:
        llm.new_policy_cache(p)


def _memory(row: Row, llm, stats: dict, peak: int) -> None:
    seen, held, nbytes = stats["seen"], stats["kept"], stats["kv_bytes"]
    row.tokens_seen, row.tokens_held, row.kv_bytes, row.kv_bytes_peak = seen, held, nbytes, peak
    if nbytes:
        row.bytes_per_token = nbytes / held
        row.bytes_per_token_seen = nbytes / seen
        row.compression_ratio = seen * dense_bytes_per_token(llm, FP16_BYTES) / nbytes
        row.compression_vs_dense = seen * llm.kv_bytes_per_token / nbytes


def run_policy(llm, policy: str, cfg: SweepConfig, cases: list[needle.NeedleCase],
               advance: Callable[[float], None]) -> Row:
    row = Row(policy)
    longest = max(cfg.contexts)
    ids = corpus_token_ids(llm.tokenizer, longest + 1)
    cache = llm.new_policy_cache(policy)
    losses = token_losses(llm, ids[:longest], cache=cache, chunk=cfg.chunk, on_chunk=advance)
    row.perplexity_by_context = {str(n): losses.perplexity(0, n - 1) for n in cfg.contexts}
    row.perplexity = row.perplexity_by_context[str(longest)]
    _memory(row, llm, losses.stats, losses.peak_kv_bytes)
    if not cfg.skip_speed:
        if cfg.speed_context == longest:  # keep decoding where the perplexity pass stopped
            r = speed.decode_speed(llm, policy, steps=cfg.speed_steps, repeats=cfg.speed_repeats, cache=cache,
                                   first_token=ids[longest])
        else:
            del cache
            r = speed.decode_speed(llm, policy, cfg.speed_context, cfg.speed_steps, cfg.speed_repeats)
        row.decode_tok_s, row.decode_tok_s_runs, row.decode_context = r.tok_s, r.runs, r.context
        advance(speed_units(cfg))
    if cases:
        answers = []
        for case in cases:
            answers.append(needle.answer_case(llm, case, policy, chunk=cfg.needle_chunk))
            advance(case.length)
        row.needle_answers = [asdict(a) for a in answers]
        row.needle_accuracy = sum(a.correct for a in answers) / len(answers)
        row.needle_by_length = needle.accuracy_by_length(cases, {a.case_id: a.correct for a in answers})
    return row


def speed_units(cfg: SweepConfig) -> float:
    """Progress units (about prefill tokens) a speed measurement is worth: a decode step ~ 16 tokens."""
    return 16 * cfg.speed_steps * (cfg.speed_repeats + 1)


def hf_rows(llm, cfg: SweepConfig, advance: Callable[[float], None]) -> list[Row]:
    hf_model = speed.load_hf_model(llm)
    rows = []
    for kind in ("dynamic", "quantized"):
        r = speed.hf_decode_speed(llm, hf_model, kind, cfg.speed_context, cfg.speed_steps, cfg.speed_repeats)
        rows.append(Row(r.name, kind="hf", decode_tok_s=r.tok_s, decode_tok_s_runs=r.runs, decode_context=r.context,
                        note=r.note))
        advance(speed_units(cfg) + cfg.speed_context)
    return rows


def total_units(cfg: SweepConfig, n_policies: int, cases: list[needle.NeedleCase]) -> float:
    per = max(cfg.contexts) + sum(c.length for c in cases)
    if not cfg.skip_speed:
        per += speed_units(cfg) + (0 if cfg.speed_context == max(cfg.contexts) else cfg.speed_context)
    hf = 2 * (speed_units(cfg) + cfg.speed_context) if "hf" in cfg.baselines and not cfg.skip_speed else 0
    return per * n_policies + hf


def run_sweep(llm, cfg: SweepConfig, progress=None, log: Callable[[str], None] = print) -> list[Row]:
    """Every policy, then the baselines; `progress` is a rich Progress (or None)."""
    check_policies(llm, cfg.policies)
    cases = [] if cfg.skip_needle else needle.make_cases(llm.tokenizer, cfg.needle_lengths, cfg.needle_depths,
                                                          cfg.seed)
    out = Path(cfg.out_dir)
    cases_path = needle.write_cases(out / "needle_cases.json", cases, llm.model_dir) if cases else None
    task = progress.add_task("eval", total=total_units(cfg, len(cfg.policies), cases)) if progress else None

    def advance(units: float) -> None:
        if progress:
            progress.advance(task, units)

    rows = []
    for policy in cfg.policies:
        if progress:
            progress.update(task, description=policy)
        rows.append(run_policy(llm, policy, cfg, cases, advance))
    if "hf" in cfg.baselines and not cfg.skip_speed:
        if progress:
            progress.update(task, description="transformers baselines")
        rows.extend(hf_rows(llm, cfg, advance))
    if "kvpress" in cfg.baselines and cases_path is not None:
        rows.extend(kvpress_rows(llm, cfg, cases, cases_path, log))
    return rows


def kvpress_rows(llm, cfg: SweepConfig, cases, cases_path: Path, log) -> list[Row]:
    results = kvpress.run_driver(cfg.kvpress_python, cases_path, cfg.kvpress_presses, cfg.kvpress_ratios,
                                 Path(cfg.out_dir) / "kvpress_results.json", log)
    if results is None:
        return []
    fp16_per_dense = dense_bytes_per_token(llm, FP16_BYTES) / llm.kv_bytes_per_token
    rows = []
    for (press, ratio), answers in kvpress.group(results, cases).items():
        acc = sum(a["correct"] for a in answers) / len(answers)
        rows.append(Row(f"kvpress:{press},ratio={ratio:g}", kind="kvpress", needle_accuracy=acc,
                        needle_by_length=needle.accuracy_by_length(cases, {a["id"]: a["correct"] for a in answers}),
                        needle_answers=answers, compression_ratio=fp16_per_dense / (1 - ratio),
                        compression_vs_dense=1 / (1 - ratio),
                        note="kvpress driver; compression placed as the same token fraction in our model dtype"))
    return rows


def parse_list(text: str, kind: type, what: str) -> list:
    """Comma-separated numbers from a flag (an error names the flag)."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KVCacheError(f"{what} must be comma-separated {kind.__name__}s, got '{text}'.") from None
    if not values:
        raise KVCacheError(f"{what} needs at least one value.")
    return values
