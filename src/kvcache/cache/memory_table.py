"""Render a :class:`~kvcache.cache.spec.MemoryReport` as rich tables for the CLI: the KV cache,
then the weights under each quantization."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table

from kvcache.cache.spec import MemoryReport, format_bytes, weight_row

_ROW_NAMES = {"none_fp32": "none (fp32)", "none_bf16": "none (bf16 / fp16)", "int8": "int8", "int4": "int4",
              "gguf": "gguf"}


def _bytes_cells(n: int) -> tuple[str, str]:
    return format_bytes(n), f"{n:,}"


def _count(n: int, word: str) -> str:
    """'1 sequence', '2 sequences'."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def render_memory_report(report: MemoryReport) -> RenderableType:
    """The KV table (bytes per token, per layer, total, and budget capacity if a budget is set),
    followed by the weights table when the report has weights.

    Each size is shown human-readable (binary units) and as an exact byte count
    with thousands separators.
    """
    kv = _kv_table(report)
    return kv if report.weights is None else Group(kv, _weights_table(report))


def _kv_table(report: MemoryReport) -> Table:
    title = (
        f"KV cache: {report.model or 'model'} - {report.dtype} "
        f"({report.bits_per_value:g} bits/value)"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("Quantity")
    table.add_column("Size", justify="right")
    table.add_column("Bytes", justify="right")

    per_layer = report.bytes_per_token_per_layer
    table.add_row("Per token, per layer (K+V)", *_bytes_cells(per_layer))
    table.add_row(f"Per token ({report.num_layers} layers)", *_bytes_cells(report.bytes_per_token))
    table.add_row(
        f"Total: {report.seq_len:,} tokens x batch {report.batch:,}",
        *_bytes_cells(report.total_bytes),
    )
    if report.total_with_weights_bytes is not None:
        table.add_row(f"Total with the {_chosen_name(report)} weights", *_bytes_cells(report.total_with_weights_bytes))

    if report.budget_bytes is not None:
        per_token = report.bytes_per_token
        table.add_section()
        table.add_row("Budget", *_bytes_cells(report.budget_bytes))
        if report.weight_bytes is not None and report.kv_budget_bytes is not None:
            table.add_row(f"Weights: {_chosen_name(report)}", *_bytes_cells(report.weight_bytes))
            table.add_row("Left for the KV cache", *_bytes_cells(report.kv_budget_bytes))
            n = report.users_at_seq_len
            table.add_row(f"Users at {report.seq_len:,} tokens beside the weights", _count(n, "sequence"),
                          f"{n * report.seq_len * per_token:,}")
            n = report.max_seq_len_with_weights
            table.add_row(f"Max seq len at batch {report.batch:,} beside the weights", _count(n, "token"),
                          f"{n * report.batch * per_token:,}")
            table.add_section()
        if report.max_seq_len_at_batch is not None:
            n = report.max_seq_len_at_batch
            table.add_row(
                f"Max seq len at batch {report.batch:,}, KV alone",
                _count(n, "token"),
                f"{n * report.batch * per_token:,}",
            )
        if report.max_batch_at_seq_len is not None:
            n = report.max_batch_at_seq_len
            table.add_row(
                f"Max batch at {report.seq_len:,} tokens, KV alone",
                _count(n, "sequence"),
                f"{n * report.seq_len * per_token:,}",
            )
        if report.blocks_in_budget is not None and report.block_size is not None:
            table.add_row(
                f"Blocks of {report.block_size} tokens",
                _count(report.blocks_in_budget, "block"),
                f"{report.blocks_in_budget * report.block_size * per_token:,}",
            )
        if report.tokens_in_budget is not None:
            table.add_row(
                "Tokens in budget (whole blocks)",
                _count(report.tokens_in_budget, "token"),
                f"{report.tokens_in_budget * per_token:,}",
            )

    notes = []
    ctx = report.max_position_embeddings
    if ctx is not None and report.seq_len > ctx:
        notes.append(f"Note: seq len {report.seq_len:,} exceeds the model's context of {ctx:,} tokens.")
    if report.kv_budget_bytes == 0:
        notes.append(f"Note: the {_chosen_name(report)} weights leave no room for the KV cache.")
    if notes:
        table.caption = " ".join(notes)
    return table


def _chosen_row(report: MemoryReport) -> str:
    return weight_row(report.weights_quantization or "none", report.weights_float_dtype or "bf16")


def _chosen_name(report: MemoryReport) -> str:
    return _ROW_NAMES[_chosen_row(report)]


def _weights_table(report: MemoryReport) -> Table:
    """One row per quantization: the weights' bytes and, with a budget, the users that fit beside them."""
    weights = report.weights or {}
    chosen = _chosen_row(report)
    table = Table(title=f"Weights: {report.model or 'model'}", title_justify="left")
    table.add_column("Weights")
    table.add_column("Size", justify="right")
    table.add_column("Bytes", justify="right")
    users = report.users_at_seq_len_by_weights
    if users is not None:
        table.add_column(f"Users at {report.seq_len:,} tokens in {format_bytes(report.budget_bytes or 0)}",
                         justify="right")
    for row, name in _ROW_NAMES.items():
        w = weights.get(row)
        cells = [f"{name} *" if row == chosen else name, *(_bytes_cells(w) if w is not None else ("n/a", "n/a"))]
        if users is not None:
            cells.append("n/a" if users.get(row) is None else f"{users[row]:,}")
        table.add_row(*cells)
    table.caption = (f"* the --weights choice. int8, int4 and gguf keep norms and float tensors in "
                     f"{report.weights_float_dtype}.")
    if all(w is None for w in weights.values()):
        table.caption = "The model's config gives no vocab_size or intermediate_size: weights unknown."
    return table
