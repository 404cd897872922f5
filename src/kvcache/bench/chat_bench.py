"""`kvcache bench chat`: time to first token of a late chat turn, cached session vs recompute.

A `ChatSession` turn starts from the blocks the turns before left in the engine's prefix
cache, so turn N prefills only the new message (and the tail of the last block); the baseline
renders the same history and prefills all of it (`llm.chat` with the prefix cache emptied
first). Each repeat starts from an empty prefix cache too. Both produce the same reply; the
figure is their TTFT ratio at turn N (medians over repeats).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

from kvcache.bench.common import corpus_text
from kvcache.engine.sampling import SamplingParams


@dataclass
class ChatTurnResult:
    turn: int
    history_tokens: int  # prompt tokens at this turn
    cached_prompt_tokens: int
    session_ttft_ms: float
    recompute_ttft_ms: float
    speedup: float
    same_reply: bool
    session_ttft_ms_runs: list[float] = field(default_factory=list)  # every repeat
    recompute_ttft_ms_runs: list[float] = field(default_factory=list)


def _messages(n_turns: int, words: int) -> list[str]:
    """Deterministic user messages of about `words` words each, from Python's own docs."""
    text = corpus_text().split()
    return [f"Here is part {i + 1} of a document; remember it. " + " ".join(text[i * words : (i + 1) * words])
            for i in range(n_turns - 1)] + ["Summarise what I sent you in one sentence."]


def run(llm, turns: int = 5, words: int = 150, reply_tokens: int = 32, repeats: int = 3,
        system: str | None = None) -> ChatTurnResult:
    """Play `turns` turns in a session `repeats` times; compare the last turn with a recompute."""
    params = SamplingParams(max_tokens=reply_tokens, temperature=0.0)
    msgs = _messages(turns, words)
    session_ttft, recompute_ttft, last, same = [], [], None, True
    for _ in range(repeats):
        llm.engine.kv.reset_prefix_cache()  # no blocks from the repeat before
        session = llm.session(system=system)
        for text in msgs[:-1]:
            session.send(text, params)
        history = list(session.messages) + [{"role": "user", "content": msgs[-1]}]
        last = session.send(msgs[-1], params)
        llm.engine.kv.reset_prefix_cache()  # the baseline recomputes the history: no cached blocks
        ref = llm.chat(history, params)
        session_ttft.append(last.metrics.ttft_s)
        recompute_ttft.append(ref.metrics.ttft_s)
        same = same and ref.token_ids == last.token_ids
    s, r = statistics.median(session_ttft), statistics.median(recompute_ttft)
    return ChatTurnResult(turns, last.metrics.prompt_tokens, last.metrics.cached_prompt_tokens,
                          s * 1e3, r * 1e3, r / s, same, [t * 1e3 for t in session_ttft],
                          [t * 1e3 for t in recompute_ttft])


def to_json(result: ChatTurnResult) -> dict:
    """The result without its raw repeats (the record keeps those)."""
    return {k: v for k, v in asdict(result).items() if not k.endswith("_runs")}


def record_fields(result: ChatTurnResult) -> dict:
    """The benchmark record's parts: ours is the session cache, the baseline recomputes the history."""
    return {"timings": {"session_ttft_ms": result.session_ttft_ms_runs},
            "baseline_timings": {"recompute_ttft_ms": result.recompute_ttft_ms_runs},
            "results": to_json(result)}
