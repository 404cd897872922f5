"""`kvcache chat`: one-shot and interactive chat on a `ChatSession` (streams the reply)."""

from __future__ import annotations

import sys

from kvcache.cache.spec import format_bytes
from kvcache.errors import KVCacheError

HELP = "commands: /reset (forget the conversation), /stats (cache figures), exit"


def _stream_reply(session, text: str, params) -> None:
    out = None
    for piece in session.stream(text, params):
        if isinstance(piece, str):
            sys.stdout.write(piece)
            sys.stdout.flush()
        else:
            out = piece
    sys.stdout.write("\n")
    return out


def one_shot(session, message: str, params) -> int:
    _stream_reply(session, message, params)
    return 0


def _stats_line(session) -> str:
    s = session.stats()
    out = session.last_output
    line = (f"turns {s['turns']}, cache holds {s['cached_tokens']} tokens = {format_bytes(s['kv_cache_bytes'])}"
            f" (allocated {format_bytes(s['kv_cache_allocated_bytes'])}), truncations {s['truncations']},"
            f" summaries {s['summaries']}")
    if out is not None:
        m = out.metrics
        line += (f"; last turn: prompt {m.prompt_tokens} tokens, {m.cached_prompt_tokens} reused from cache, "
                 f"ttft {m.ttft_s * 1e3:.0f} ms, decode {m.decode_tok_s:.1f} tok/s")
    return line


def repl(session, params) -> int:
    print(HELP, file=sys.stderr)
    while True:
        try:
            text = input(">>> ")
        except EOFError:
            print()
            return 0
        cmd = text.strip()
        if not cmd:
            continue
        if cmd in ("exit", "quit", "/exit", "/quit"):
            return 0
        if cmd == "/reset":
            session.reset()
            print("(conversation cleared)")
            continue
        if cmd == "/stats":
            print(_stats_line(session))
            continue
        if cmd.startswith("/"):
            print(f"unknown command {cmd}; {HELP}")
            continue
        try:
            _stream_reply(session, text, params)
        except KVCacheError as exc:
            print(f"error: {exc}", file=sys.stderr)
