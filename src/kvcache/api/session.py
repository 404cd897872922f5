"""`ChatSession`: a conversation whose turns reuse the K/V of the turns before.

Each turn is one request to the LLM's engine whose prompt is the whole conversation rendered
with the chat template. The engine's prefix cache still holds the full blocks the previous
turn computed (its prompt and reply), so the new request starts from those hits and computes
only the rest: the tail of the last block, the new message and the template tokens around it.
Every KV policy the engine runs applies to chat turns too. Under a policy that gives each
request its own cache there is no prefix cache: the engine keeps the last turn's cache for
the session's next request instead (`engine/kept_caches.py`), with the same effect.

When the conversation would pass its budget (`max_history_tokens`, default max_model_len),
the overflow policy decides: `truncate` drops the oldest turns, `summarize` has the model
condense them into a short note kept right after the system message, `error` refuses. Both
remedies change the start of the conversation, so the prefix cache hits only what stays the same.

`snapshot()` / `restore()` save and load a conversation with its K/V through the engine's
session path (`persist.snapshot_prefix` / `restore_prefix`, the files the server reads).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from kvcache.cache.snapshot import KVSnapshot
from kvcache.engine.history import OVERFLOW_POLICIES, SUMMARY_PREFIX, fit_history
from kvcache.engine.length_rule import check_length
from kvcache.engine.outputs import RequestOutput
from kvcache.engine.persist import fingerprint, restore_prefix, snapshot_prefix
from kvcache.engine.sampling import SamplingParams
from kvcache.errors import KVCacheError

__all__ = ["OVERFLOW_POLICIES", "SUMMARY_PREFIX", "ChatSession"]
_CONVERSATIONS = itertools.count()
SUMMARY_REQUEST = "Summarize this conversation in two or three short sentences, keeping names, numbers and facts:"


class ChatSession:
    """Multi-turn chat on the LLM's engine, reusing earlier turns' K/V. `send()` a message, get the reply."""

    def __init__(self, llm, system: str | None = None, overflow: str = "truncate",
                 max_history_tokens: int | None = None, summary_tokens: int = 64):
        if overflow not in OVERFLOW_POLICIES:
            raise KVCacheError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got '{overflow}'.")
        if max_history_tokens is not None and not 0 < max_history_tokens <= llm.max_model_len:
            raise KVCacheError(f"max_history_tokens must be in [1, {llm.max_model_len}], got {max_history_tokens}.")
        self.llm, self.system, self.overflow = llm, system, overflow
        self.budget = max_history_tokens or llm.max_model_len
        self.summary_tokens = summary_tokens
        self.conversation = f"chat-{next(_CONVERSATIONS)}"  # what the engine keeps for this chat's next turn
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (its blocks stay in the prefix cache until the pool needs them;
        a per-request cache kept for its next turn is freed)."""
        self.llm.engine.end_conversation(self.conversation)
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.token_ids: list[int] = []  # the last turn's prompt and reply, but its last token: K/V computed
        self.turns = 0
        self.truncations = 0
        self.summaries = 0
        self.summary: str | None = None  # the note that stands for the summarised turns
        self.last_output: RequestOutput | None = None

    def _fit(self, messages: list[dict], max_tokens: int) -> tuple[list[dict], list[int], str | None]:
        """Render the conversation within the budget (`history.fit_history`); returns (messages, ids,
        what was done: None, "truncated" or "summarized")."""
        return fit_history(messages, self.llm.chat_ids, max_tokens, self.budget, self.overflow, self._summarize)

    def _summarize(self, head: list[dict], old: list[dict]) -> list[dict]:
        """Condense `old` turns (and any earlier summary) into one note after the system message."""
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in old]
        if self.summary:
            lines.insert(0, f"Earlier: {self.summary}")
        request = [{"role": "user", "content": SUMMARY_REQUEST + "\n\n" + "\n".join(lines)}]
        ids = self.llm.chat_ids(request)
        room = self.llm.max_model_len - self.summary_tokens
        ids = ids[-room:] if len(ids) > room else ids
        params = SamplingParams(max_tokens=min(self.summary_tokens, max(1, self.budget // 4)), temperature=0.0)
        self.summary = self.llm.generate([ids], params)[0].text.strip() or (self.summary or "")
        self.summaries += 1
        system = [m for m in head if not m["content"].startswith(SUMMARY_PREFIX)]
        return system + [{"role": "system", "content": SUMMARY_PREFIX + self.summary}]

    def stream(self, text: str, params: SamplingParams | None = None) -> Iterator[str | RequestOutput]:
        """Like `send`, but yields the reply's text pieces as produced, then the `RequestOutput`."""
        params = params or SamplingParams()
        if not isinstance(text, str) or not text.strip():
            raise KVCacheError("The message is empty.")
        check_length(params.max_tokens, self.llm.max_model_len)  # no history can make room for more
        messages, ids, remedy = self._fit(self.messages + [{"role": "user", "content": text}], params.max_tokens)
        engine = self.llm.engine
        req = engine.add_request(ids, params, eos_ids=self.llm.eos_ids, conversation=self.conversation)
        yield from engine.stream(req)
        out = req.to_output()
        if out.error:
            raise KVCacheError(out.error)
        self.token_ids = (ids + out.token_ids)[:-1]  # the last token was sampled, never computed
        out.metrics.history_truncated = remedy == "truncated"
        out.metrics.history_summarized = remedy == "summarized"
        self.truncations += int(remedy == "truncated")
        self.messages = messages + [{"role": "assistant", "content": out.text}]
        self.turns += 1
        self.last_output = out
        yield out

    def send(self, text: str, params: SamplingParams | None = None) -> RequestOutput:
        """Add a user message, generate the reply on top of the cached history, return it."""
        *_, out = self.stream(text, params)
        return out

    def stats(self) -> dict:
        """Turns so far, what the engine still caches of the conversation, truncations, summaries."""
        engine = self.llm.engine
        tokens, nbytes = engine.conversation_tokens(self.conversation, self.token_ids)
        return {
            "turns": self.turns,
            "cached_tokens": tokens,  # what the engine holds for the next turn
            "kv_cache_bytes": nbytes,
            "kv_cache_allocated_bytes": engine.storage.nbytes,  # the engine's pool, shared by every request
            "truncations": self.truncations,
            "summaries": self.summaries,
            "summary": self.summary,
            "last_prompt_tokens": self.last_output.metrics.prompt_tokens if self.last_output else 0,
            "last_cached_prompt_tokens": self.last_output.metrics.cached_prompt_tokens if self.last_output else 0,
        }

    # -- saved sessions ---------------------------------------------------------------
    def snapshot(self) -> KVSnapshot:
        """The conversation and the K/V of its full blocks, read from the engine's prefix cache
        (blocks it let go are computed again first): a session file, as the server saves them."""
        if not self.messages or not self.token_ids:
            raise KVCacheError("The conversation is empty; there is nothing to save.")
        engine = self._session_engine()
        bs = engine.kv.block_size
        if len(self.token_ids) < bs:
            raise KVCacheError(f"The conversation has {len(self.token_ids)} tokens, less than one {bs}-token "
                               "KV block; there is nothing to save yet.")
        fp = fingerprint(self.llm)
        snap = snapshot_prefix(engine, self.token_ids, fp, self.messages)
        if snap is None:  # compute the missing blocks (one prefill), then read them
            engine.run_to_completion([engine.add_request(self.token_ids, SamplingParams(max_tokens=1, temperature=0.0))])
            snap = snapshot_prefix(engine, self.token_ids, fp, self.messages)
        if snap is None:
            raise KVCacheError("The KV cache let this conversation go while saving it; try again.")
        return snap

    def restore(self, snap: KVSnapshot) -> None:
        """Continue a saved conversation: its messages, and its full blocks written into the
        engine's prefix cache. Refused, the conversation untouched, when the file has no
        messages or the pool has too few free blocks."""
        if not snap.messages:
            raise KVCacheError("This session was saved without its messages, so a chat cannot continue it.")
        restore_prefix(self._session_engine(), snap)
        self.reset()
        self.messages = [dict(m) for m in snap.messages]
        self.token_ids = list(snap.token_ids)
        self.turns = sum(1 for m in self.messages if m.get("role") == "assistant")

    def _session_engine(self):
        engine = self.llm.engine
        if not engine.storage.saves_sessions:
            raise KVCacheError(f"Sessions are saved from float KV blocks; this chat holds its KV cache otherwise "
                               f"('{self.llm.kv_policy.text}').")
        return engine
