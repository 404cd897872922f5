"""`kvcache chat`: one-shot and interactive chat on a `ChatSession` (streams the reply)."""

from __future__ import annotations

import sys

from kvcache.cache.spec import format_bytes
from kvcache.cli_paths import os_error_sentence
from kvcache.errors import KVCacheError

HELP = ("commands: /reset (forget the conversation), /stats (cache figures), /save NAME and /load NAME "
        "(the conversation and its KV cache, on disk), /sessions, exit")


HELP_SOLO = "commands: /reset (forget the conversation), /stats (cache figures), exit"


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


def session_command(session, store, cmd: str) -> str:
    """Run /save NAME, /load NAME or /sessions on `store`; returns the line to print."""
    verb, _, name = cmd.partition(" ")
    name = name.strip()
    if verb == "/sessions":
        infos = store.list()
        return "\n".join(f"{i.name}: {i.num_tokens} tokens, {format_bytes(i.bytes)}"
                         f"{'' if i.compatible else ' (another model)'}" for i in infos) or "(no saved sessions)"
    if not name:
        return f"usage: {verb} NAME"
    if verb == "/save":
        snap = session.snapshot()
        size = store.save(name, snap)
        return f"(saved {snap.num_tokens} tokens of KV cache, {format_bytes(size)}, as '{name}')"
    snap = store.load(name)
    session.restore(snap)
    return f"(loaded '{name}': {len(session.messages)} messages, {snap.num_tokens} tokens already cached)"


def repl(session, params, sessions_dir=None, saves: bool = True) -> int:
    """Chat on stdin. `saves=False` (the solo runtime): no /save, /load or /sessions."""
    store = None
    if saves:
        from kvcache.engine.persist import SessionStore, default_sessions_dir

        store = SessionStore(sessions_dir or default_sessions_dir(), session.llm)
    commands = HELP if saves else HELP_SOLO
    print(commands, file=sys.stderr)
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
        if cmd.split(" ")[0] in ("/save", "/load", "/sessions"):
            if store is None:
                print("(--solo keeps no sessions on disk; /save and /load run in kvcache chat without --solo)")
                continue
            try:
                print(session_command(session, store, cmd))
            except KVCacheError as exc:
                print(f"error: {exc}", file=sys.stderr)
            except OSError as exc:  # e.g. a sessions folder that cannot be written: keep chatting
                print(f"error: {cmd.split(' ')[0]} failed, the conversation is kept: {os_error_sentence(exc)}",
                      file=sys.stderr)
            continue
        if cmd.startswith("/"):
            print(f"unknown command {cmd}; {commands}")
            continue
        try:
            _stream_reply(session, text, params)
        except KVCacheError as exc:
            print(f"error: {exc}", file=sys.stderr)
