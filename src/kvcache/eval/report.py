"""The sweep's outputs: a markdown table (results.md), PNG plots and a terminal table."""

from __future__ import annotations

from pathlib import Path


def _num(x, fmt: str = "{:.2f}") -> str:
    return "" if x is None else fmt.format(x)


def table_rows(rows, contexts: list[int]) -> tuple[list[str], list[list[str]]]:
    """Header and cells shared by the markdown and the terminal table."""
    head = ["policy", "bytes/token held", "bytes/token seen", "compression vs fp16"]
    head += [f"ppl @{n}" for n in contexts] + ["needle acc", "decode tok/s", "note"]
    cells = []
    for r in rows:
        line = [r.policy, _num(r.bytes_per_token, "{:,.0f}"), _num(r.bytes_per_token_seen, "{:,.0f}"),
                _num(r.compression_ratio, "{:.2f}x")]
        line += [_num(r.perplexity_by_context.get(str(n))) for n in contexts]
        line += [_num(r.needle_accuracy, "{:.0%}"), _num(r.decode_tok_s, "{:.1f}"), r.note]
        cells.append(line)
    return head, cells


def write_markdown(path: Path, rows, contexts: list[int], header: str) -> Path:
    head, cells = table_rows(rows, contexts)
    lines = [header, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in cells]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def terminal_table(rows, contexts: list[int], title: str):
    from rich.table import Table

    head, cells = table_rows(rows, contexts)
    t = Table(title=title)
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i in (0, len(head) - 1) else "right", overflow="fold")
    for line in cells:
        t.add_row(*line)
    return t


def _scatter(ax, rows, y_of, label_of=lambda r: r.policy) -> None:
    groups = {"policy": ("o", None), "derived": ("o", "none"), "kvpress": ("s", None)}
    stacked: dict[tuple[float, float], int] = {}
    for kind, (marker, face) in groups.items():
        pts = [(r.compression_ratio, y_of(r), label_of(r)) for r in rows
               if r.kind == kind and r.compression_ratio and y_of(r) is not None]
        if not pts:
            continue
        xs, ys, labels = zip(*pts)
        ax.scatter(xs, ys, marker=marker, facecolors=face, edgecolors="C0" if kind != "kvpress" else "C3",
                   color=None if face else ("C0" if kind != "kvpress" else "C3"), label=kind, zorder=3)
        for x, y, name in zip(xs, ys, labels):
            k = (round(x, 3), round(y, 3))  # points that coincide get their labels stacked
            stacked[k] = stacked.get(k, -1) + 1
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3 + 8 * stacked[k]), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV compression vs a dense fp16 cache (fp16 bytes of the tokens seen / bytes held)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_perplexity(path: Path, rows, context: int, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    _scatter(ax, rows, lambda r: r.perplexity_by_context.get(str(context)))
    ax.set_yscale("log")
    ax.set_ylabel(f"perplexity at {context} tokens (lower is better)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_needle(path: Path, rows, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    _scatter(ax, rows, lambda r: r.needle_accuracy)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("needle accuracy (fraction of cases answered)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
