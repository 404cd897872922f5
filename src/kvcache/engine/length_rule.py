"""The one length rule shared by the CLI, the Python API and the server.

A request fits when prompt + max_tokens <= max_model_len. With truncation "error" a request
that does not fit is refused; with "left" the prompt may lose its oldest tokens, so only a
max_tokens that leaves no room for any prompt token (>= max_model_len) is refused.
"""

from __future__ import annotations

from kvcache.errors import MaxTokensTooLargeError, PromptTooLongError


def check_length(max_tokens: int, max_model_len: int, prompt_len: int | None = None,
                 truncation: str = "error") -> None:
    """Raise `PromptTooLongError` / `MaxTokensTooLargeError` (both `ValueError`s, one sentence)
    if `max_tokens` new tokens after a `prompt_len`-token prompt cannot fit in the context.
    Without `prompt_len`, only the part that holds for every prompt is checked."""
    limit = max_model_len
    if prompt_len is not None and truncation == "error":
        room = limit - prompt_len
        if room < 1:
            raise PromptTooLongError(
                f"The prompt has {_tokens(prompt_len)} but max_model_len is {limit}, leaving no room to generate.")
        if max_tokens > room:
            raise MaxTokensTooLargeError(
                f"max_tokens is {max_tokens} but the prompt has {_tokens(prompt_len)} and the context is {limit}, "
                f"so at most {room} can be generated.")
    if max_tokens >= limit:
        raise MaxTokensTooLargeError(f"max_tokens is {max_tokens} but the context is {limit}.")


def _tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"
