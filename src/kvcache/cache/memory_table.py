"""Render a :class:`~kvcache.cache.spec.MemoryReport` as a rich table for the CLI."""

from __future__ import annotations

from rich.table import Table

from kvcache.cache.spec import MemoryReport, format_bytes


def _bytes_cells(n: int) -> tuple[str, str]:
    return format_bytes(n), f"{n:,}"


def render_memory_report(report: MemoryReport) -> Table:
    """Build a table: bytes per token, per layer, total, and budget capacity if a budget is set.

    Each size is shown human-readable (binary units) and as an exact byte count
    with thousands separators.
    """
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

    if report.budget_bytes is not None:
        per_token = report.bytes_per_token
        table.add_section()
        table.add_row("Budget", *_bytes_cells(report.budget_bytes))
        if report.max_seq_len_at_batch is not None:
            n = report.max_seq_len_at_batch
            table.add_row(
                f"Max seq len at batch {report.batch:,}",
                f"{n:,} tokens",
                f"{n * report.batch * per_token:,}",
            )
        if report.max_batch_at_seq_len is not None:
            n = report.max_batch_at_seq_len
            table.add_row(
                f"Max batch at {report.seq_len:,} tokens",
                f"{n:,} sequences",
                f"{n * report.seq_len * per_token:,}",
            )
        if report.blocks_in_budget is not None and report.block_size is not None:
            table.add_row(
                f"Blocks of {report.block_size} tokens",
                f"{report.blocks_in_budget:,} blocks",
                f"{report.blocks_in_budget * report.block_size * per_token:,}",
            )
        if report.tokens_in_budget is not None:
            table.add_row(
                "Tokens in budget (whole blocks)",
                f"{report.tokens_in_budget:,} tokens",
                f"{report.tokens_in_budget * per_token:,}",
            )

    ctx = report.max_position_embeddings
    if ctx is not None and report.seq_len > ctx:
        table.caption = (
            f"Note: seq len {report.seq_len:,} exceeds the model's context of {ctx:,} tokens."
        )
    return table
