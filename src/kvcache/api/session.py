"""`ChatSession`: a conversation that keeps its KV cache between turns.

Each turn renders the whole conversation with the chat template, finds how many leading
tokens the cache already holds (the longest common prefix with what it computed before),
and prefills only the rest: the new message and the template tokens around it.

When the conversation would pass its budget (`max_history_tokens`, default max_model_len),
the overflow policy decides: `truncate` drops the oldest turns, `summarize` has the model
condense them into a short note kept right after the system message, `error` refuses. Both
remedies change the start of the conversation, so the cache is rebuilt from there.
"""

from __future__ import annotations

from collections.abc import Iterator

from kvcache.cache.dense import KVCache
from kvcache.engine.generate import BatchGeneration
from kvcache.engine.length_rule import check_length
from kvcache.engine.outputs import RequestOutput
from kvcache.engine.sampling import SamplingParams
from kvcache.errors import KVCacheError, PromptTooLongError

OVERFLOW_POLICIES = ("truncate", "summarize", "error")
SUMMARY_PREFIX = "Summary of the earlier conversation: "
SUMMARY_REQUEST = "Summarize this conversation in two or three short sentences, keeping names, numbers and facts:"


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatSession:
    """Multi-turn chat over one persistent cache. `send()` a message, get the reply."""

    def __init__(self, llm, system: str | None = None, overflow: str = "truncate",
                 max_history_tokens: int | None = None, summary_tokens: int = 64):
        if overflow not in OVERFLOW_POLICIES:
            raise KVCacheError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got '{overflow}'.")
        if max_history_tokens is not None and not 0 < max_history_tokens <= llm.max_model_len:
            raise KVCacheError(f"max_history_tokens must be in [1, {llm.max_model_len}], got {max_history_tokens}.")
        self.llm, self.system, self.overflow = llm, system, overflow
        self.budget = max_history_tokens or llm.max_model_len
        self.summary_tokens = summary_tokens
        self.cache = KVCache.for_model(llm.model, 1, 256) if llm.kv_policy.is_full else llm.new_policy_cache()
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and its cache."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache.clear()
        self.cached_ids: list[int] = []  # tokens whose K/V occupy cache slots [0, len)
        self.turns = 0
        self.truncations = 0
        self.summaries = 0
        self.summary: str | None = None  # the note that stands for the summarised turns
        self.last_output: RequestOutput | None = None

    def _fit(self, messages: list[dict], max_tokens: int) -> tuple[list[dict], list[int], str | None]:
        """Render the conversation within the budget; returns (messages, ids, what was done:
        None, "truncated" or "summarized")."""
        limit = self.budget
        done = None
        while True:
            ids = self.llm.chat_ids(messages)
            if len(ids) + max_tokens <= limit:
                return messages, ids, done
            first = self._first_turn(messages)
            turns = len(messages) - first
            if turns <= 1 and first > 0 and messages[first - 1]["content"].startswith(SUMMARY_PREFIX):
                messages = messages[: first - 1] + messages[first:]  # even the note does not fit: drop it
                done = "truncated"
                continue
            if self.overflow == "error" or turns <= 1:
                if len(ids) < limit and self.overflow != "error":
                    return messages, ids, done  # only the new message left: generate what fits
                raise PromptTooLongError(
                    f"The conversation needs {len(ids)} tokens plus {max_tokens} to generate, "
                    f"more than the budget of {limit}."
                )
            if self.overflow == "summarize" and turns >= 3:
                old = messages[first : first + max(2, (turns - 1) // 2 // 2 * 2)]  # oldest exchanges
                messages = self._summarize(messages[:first], old) + messages[first + len(old) :]
                done = "summarized"
                continue
            drop = 2 if turns >= 3 else 1  # a user message and its reply
            messages = messages[:first] + messages[first + drop :]
            done = done or "truncated"

    def _first_turn(self, messages: list[dict]) -> int:
        """Index of the first message that may be dropped or summarised (after system and summary)."""
        i = 0
        while i < len(messages) and messages[i]["role"] == "system":
            i += 1
        return i

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
        gen = BatchGeneration(self.llm.model, self.llm.tokenizer, [ids], [params], self.llm.max_model_len,
                              self.llm.eos_ids, use_cache=True)
        self.summary = gen.run()[0].text.strip() or (self.summary or "")
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
        reuse = common_prefix_len(self.cached_ids, ids)
        reuse = min(reuse, len(ids) - 1)  # at least one token must be computed for the logits
        if reuse < self.cache.seen and not self.cache.can_truncate:  # a policy evicted: recompute
            self.cache.clear()
            reuse = 0
        self.cache.truncate(reuse)
        self.cached_ids = self.cached_ids[:reuse]  # slots past here are about to be overwritten
        gen = BatchGeneration(self.llm.model, self.llm.tokenizer, [ids], [params], self.llm.max_model_len,
                              self.llm.eos_ids, use_cache=True, cache=self.cache)
        yield from gen.text_pieces()
        out = gen.outputs()[0]
        self.cached_ids = (ids + out.token_ids)[: self.cache.seen]
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
        """Turns so far, tokens and bytes the cache holds, truncations."""
        return {
            "turns": self.turns,
            "cached_tokens": self.cache.length,
            "kv_cache_bytes": self.cache.nbytes_used,
            "kv_cache_allocated_bytes": self.cache.nbytes_allocated,
            "truncations": self.truncations,
            "summaries": self.summaries,
            "summary": self.summary,
            "last_prompt_tokens": self.last_output.metrics.prompt_tokens if self.last_output else 0,
            "last_cached_prompt_tokens": self.last_output.metrics.cached_prompt_tokens if self.last_output else 0,
        }
