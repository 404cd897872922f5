"""The streaming check: a long token stream through a bounded cache (StreamingLLM's claim).

`tokens` corpus tokens go through each policy in chunks, far past any window. If the
policy streams well, the perplexity of the last `edge` predictions stays close to that of
the first `edge`, and the resident KV bytes, sampled along the way, stop growing once the
window is full. The default pair shows why sinks matter: the same window with and without
the 4 first tokens kept (both at cache positions, so RoPE never passes the trained length).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kvcache.eval.corpus import corpus_token_ids
from kvcache.eval.perplexity import TokenLosses, token_losses

DEFAULT_STREAM_POLICIES = ("sinks:n_sink=4,window=1020", "sinks:n_sink=0,window=1024")


@dataclass
class StreamResult:
    policy: str
    tokens: int
    edge: int
    ppl_first: float  # over the first `edge` predictions
    ppl_last: float  # over the last `edge` predictions
    kv_bytes_max: int  # over the whole stream
    kv_bytes_after_fill: tuple[int, int]  # (min, max) once 2*edge tokens were seen: flat if bounded
    losses: TokenLosses

    def to_dict(self) -> dict:
        return {"policy": self.policy, "tokens": self.tokens, "edge": self.edge, "ppl_first": self.ppl_first,
                "ppl_last": self.ppl_last, "kv_bytes_max": self.kv_bytes_max,
                "kv_bytes_after_fill": list(self.kv_bytes_after_fill),
                "samples": [[s.seen, s.held, s.kv_bytes] for s in self.losses.samples]}


def run_stream(llm, policy: str, tokens: int = 20000, edge: int = 1000, chunk: int = 32,
               on_chunk: Callable[[int], None] | None = None) -> StreamResult:
    ids = corpus_token_ids(llm.tokenizer, tokens)
    losses = token_losses(llm, ids, policy, chunk, sample_every=4, on_chunk=on_chunk)
    after = [s.kv_bytes for s in losses.samples if s.seen >= 2 * edge] or [losses.samples[-1].kv_bytes]
    return StreamResult(policy, tokens, edge, losses.perplexity(0, edge), losses.perplexity(-edge),
                        losses.peak_kv_bytes, (min(after), max(after)), losses)


def plot_stream(path: Path, results: list[StreamResult], title: str, smooth: int = 500) -> Path:
    """Running perplexity (mean loss over `smooth` tokens) and resident KV bytes against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for r in results:
        nll = r.losses.nll
        smooth = max(1, min(smooth, nll.shape[0] // 2))
        kernel = torch.ones(1, 1, smooth, dtype=nll.dtype) / smooth
        run = torch.nn.functional.conv1d(nll[None, None], kernel)[0, 0].exp()  # (T - smooth,)
        ax1.plot(range(smooth, smooth + run.shape[0]), run.tolist(), label=r.policy, lw=1)
        s = r.losses.samples
        ax2.plot([x.seen for x in s], [x.kv_bytes / 2**20 for x in s], label=r.policy)
    ax1.set_ylabel(f"perplexity (running, {smooth} tokens)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    ax1.set_title(title, fontsize=9)
    ax2.set_ylabel("resident KV (MiB)")
    ax2.set_xlabel("tokens seen")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
