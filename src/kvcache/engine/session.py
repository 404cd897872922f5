"""`ChatSession`: a conversation that keeps its KV cache between turns.

Each turn renders the whole conversation with the chat template, finds how many leading
tokens the cache already holds (the longest common prefix with what it computed before),
and prefills only the rest: the new message and the template tokens around it.
"""

from __future__ import annotations

from collections.abc import Iterator

from kvcache.engine.generate import BatchGeneration
from kvcache.engine.outputs import RequestOutput
from kvcache.engine.sampling import SamplingParams
from kvcache.errors import KVCacheError, PromptTooLongError

OVERFLOW_POLICIES = ("truncate", "error")


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatSession:
    """Multi-turn chat over one persistent cache. `send()` a message, get the reply."""

    def __init__(self, llm, system: str | None = None, overflow: str = "truncate"):
        if overflow not in OVERFLOW_POLICIES:
            raise KVCacheError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got '{overflow}'.")
        self.llm, self.system, self.overflow = llm, system, overflow
        self.cache = llm.model.new_cache(1, 256) if llm.kv_policy.is_full else llm.new_policy_cache()
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and its cache."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache.clear()
        self.cached_ids: list[int] = []  # tokens whose K/V occupy cache slots [0, len)
        self.turns = 0
        self.truncations = 0
        self.last_output: RequestOutput | None = None

    def _fit(self, messages: list[dict], max_tokens: int) -> tuple[list[dict], list[int], bool]:
        """Render the conversation, dropping the oldest turns if it would pass max_model_len."""
        limit = self.llm.max_model_len
        truncated = False
        while True:
            ids = self.llm.chat_ids(messages)
            if len(ids) + max_tokens <= limit:
                return messages, ids, truncated
            first = 1 if messages and messages[0]["role"] == "system" else 0
            if self.overflow == "error" or len(messages) - first <= 1:
                if len(ids) < limit and self.overflow == "truncate":
                    return messages, ids, truncated  # only the new message left: generate what fits
                raise PromptTooLongError(
                    f"The conversation needs {len(ids)} tokens plus {max_tokens} to generate, "
                    f"more than max_model_len {limit}."
                )
            drop = 2 if len(messages) - first >= 3 else 1  # a user message and its reply
            messages = messages[:first] + messages[first + drop :]
            truncated = True

    def stream(self, text: str, params: SamplingParams | None = None) -> Iterator[str | RequestOutput]:
        """Like `send`, but yields the reply's text pieces as produced, then the `RequestOutput`."""
        params = params or SamplingParams()
        if not isinstance(text, str) or not text.strip():
            raise KVCacheError("The message is empty.")
        messages, ids, truncated = self._fit(self.messages + [{"role": "user", "content": text}], params.max_tokens)
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
        out.metrics.history_truncated = truncated
        self.truncations += int(truncated)
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
            "last_prompt_tokens": self.last_output.metrics.prompt_tokens if self.last_output else 0,
            "last_cached_prompt_tokens": self.last_output.metrics.cached_prompt_tokens if self.last_output else 0,
        }
