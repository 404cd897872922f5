"""A conversation fitted to its token budget: the one rule of `ChatSession` (api/session.py) and
the torch-free `SoloChat` (solo/runner.py). No torch.

When the rendered conversation and the reply's `max_tokens` pass the budget, `truncate` drops the
oldest turns (a user message and its reply), `summarize` has a callback condense them into one
system note, `error` refuses; the system messages and the newest message always stay.
"""

from __future__ import annotations

from collections.abc import Callable

from kvcache.errors import KVCacheError, PromptTooLongError

OVERFLOW_POLICIES = ("truncate", "summarize", "error")
SUMMARY_PREFIX = "Summary of the earlier conversation: "


def check_messages(messages: list[dict]) -> None:
    """One sentence unless every message is a dict with a role and a string content."""
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
            raise KVCacheError("Each message must be a dict with a 'role' and a string 'content'.")


def first_turn(messages: list[dict]) -> int:
    """Index of the first message that may be dropped or summarised (after system and summary)."""
    i = 0
    while i < len(messages) and messages[i]["role"] == "system":
        i += 1
    return i


def fit_history(messages: list[dict], render: Callable[[list[dict]], list[int]], max_tokens: int, limit: int,
                overflow: str, summarize: Callable[[list[dict], list[dict]], list[dict]] | None = None
                ) -> tuple[list[dict], list[int], str | None]:
    """(messages, their ids, what was done: None, "truncated" or "summarized") with
    len(ids) + max_tokens <= limit where the policy allows. `render` gives a conversation's ids;
    `summarize(head, old)` returns head with `old` condensed into a note (overflow "summarize")."""
    done = None
    while True:
        ids = render(messages)
        if len(ids) + max_tokens <= limit:
            return messages, ids, done
        first = first_turn(messages)
        turns = len(messages) - first
        if turns <= 1 and first > 0 and messages[first - 1]["content"].startswith(SUMMARY_PREFIX):
            messages = messages[: first - 1] + messages[first:]  # even the note does not fit: drop it
            done = "truncated"
            continue
        if overflow == "error" or turns <= 1:
            if len(ids) < limit and overflow != "error":
                return messages, ids, done  # only the new message left: generate what fits
            raise PromptTooLongError(
                f"The conversation needs {len(ids)} tokens plus {max_tokens} to generate, "
                f"more than the budget of {limit}."
            )
        if overflow == "summarize" and summarize is not None and turns >= 3:
            old = messages[first : first + max(2, (turns - 1) // 2 // 2 * 2)]  # oldest exchanges
            messages = summarize(messages[:first], old) + messages[first + len(old) :]
            done = "summarized"
            continue
        drop = 2 if turns >= 3 else 1  # a user message and its reply
        messages = messages[:first] + messages[first + drop :]
        done = done or "truncated"
