"""The text the evaluations read: real public prose no one here wrote.

Source: the pydoc topics that ship with Python (`pydoc_data.topics`, the text of the
language reference sections `help()` shows), concatenated in sorted key order; see
`kvcache.bench.common.corpus_text`. About 465,000 characters, ~113,000 SmolLM2 tokens, so
one source serves perplexity windows, needle filler and the 20,000-token streaming check.
"""

from __future__ import annotations

from functools import lru_cache

from kvcache.bench.common import corpus_text
from kvcache.errors import KVCacheError

__all__ = ["corpus_text", "corpus_token_ids"]


@lru_cache(maxsize=4)
def _ids(tokenizer, n_chars: int) -> tuple[int, ...]:
    return tuple(tokenizer(corpus_text()[:n_chars], add_special_tokens=False)["input_ids"])


def corpus_token_ids(tokenizer, n: int) -> list[int]:
    """The first `n` token ids of the corpus (an error if it is shorter: no repetition)."""
    text = corpus_text()
    n_chars = min(len(text), max(4096, 6 * n))  # ~4 characters per token, with margin
    ids = _ids(tokenizer, n_chars)
    if len(ids) < n and n_chars < len(text):
        ids = _ids(tokenizer, len(text))
    if len(ids) < n:
        raise KVCacheError(f"The evaluation text has only {len(ids)} tokens; {n} were asked for.")
    return list(ids[:n])
