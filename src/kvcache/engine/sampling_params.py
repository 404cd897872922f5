"""SamplingParams: how one request picks its tokens, validated once. No torch (the torch-free
runtime `kvcache.solo` takes the same object)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from kvcache.errors import KVCacheError

MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's chat limit)


@dataclass
class SamplingParams:
    """How to pick tokens for one request. temperature 0 means greedy."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] | str | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # sampled tokens' logprobs with this many top alternatives (None = off)
    prompt_logprobs: int | None = None  # the prompt tokens' logprobs too (one extra forward over the prompt)
    n: int = 1  # samples of the prompt; sample i draws from seed + i (its prompt's blocks are shared)
    json_schema: dict | str | None = None  # the output is JSON valid under this schema (a dict or its JSON text)
    json_object: bool = False  # the output is a JSON object (any keys)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise KVCacheError(f"max_tokens must be a positive integer, got {self.max_tokens!r}.")
        if not self.temperature >= 0:
            raise KVCacheError(f"temperature must be >= 0, got {self.temperature!r}.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise KVCacheError(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}.")
        if not 0 < self.top_p <= 1:
            raise KVCacheError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        if not self.repetition_penalty > 0:
            raise KVCacheError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}.")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise KVCacheError(f"n must be a positive integer, got {self.n!r}.")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 <= value <= MAX_LOGPROBS):
                raise KVCacheError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {value!r}.")
        self._check_grammar()

    def _check_grammar(self) -> None:
        """json_schema: a dict, or JSON text of one (parsed here); not with json_object."""
        if not isinstance(self.json_object, bool):
            raise KVCacheError(f"json_object must be true or false, got {self.json_object!r}.")
        if isinstance(self.json_schema, str):
            try:
                self.json_schema = json.loads(self.json_schema)
            except ValueError:
                raise KVCacheError("json_schema is not valid JSON text.") from None
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise KVCacheError(f"json_schema must be a JSON object (a dict), got {type(self.json_schema).__name__}.")
        if self.json_schema is not None and self.json_object:
            raise KVCacheError("Give json_schema or json_object, not both.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sample(self, index: int) -> SamplingParams:
        """The parameters of sample `index` of n: one sample, its own seed stream (seed + index)."""
        return replace(self, n=1, seed=None if self.seed is None else self.seed + index)

    @property
    def structured(self) -> bool:
        """Whether the output is held to a grammar (json_schema or json_object)."""
        return self.json_schema is not None or self.json_object
