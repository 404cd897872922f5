"""The length rule (prompt + max_tokens <= max_model_len) in the Python API, one sentence each time."""

from __future__ import annotations

import pytest

import kvcache
from kvcache import SamplingParams
from kvcache.engine.length_rule import check_length
from kvcache.errors import MaxTokensTooLargeError, PromptTooLongError

CONTEXT = 32


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm32(tiny_model_dir):
    return kvcache.LLM(str(tiny_model_dir), max_model_len=CONTEXT, progress=False)


@pytest.fixture(scope="module")
def llm32_left(tiny_model_dir):
    return kvcache.LLM(str(tiny_model_dir), max_model_len=CONTEXT, truncation="left", progress=False)


@pytest.mark.parametrize(("max_tokens", "prompt_len", "truncation", "error", "words"), [
    (8, 24, "error", None, None),  # exactly fills the context
    (9, 24, "error", MaxTokensTooLargeError, "at most 8 can be generated"),
    (1, 32, "error", PromptTooLongError, "leaving no room"),
    (31, 30, "left", None, None),  # the prompt may lose its oldest tokens
    (32, 1, "left", MaxTokensTooLargeError, "the context is 32"),
    (100_000_000, None, "error", MaxTokensTooLargeError, "the context is 32"),
    (31, None, "error", None, None),
])
def test_check_length(max_tokens, prompt_len, truncation, error, words):
    if error is None:
        check_length(max_tokens, CONTEXT, prompt_len, truncation)
        return
    with pytest.raises(error, match=words) as info:
        check_length(max_tokens, CONTEXT, prompt_len, truncation)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert msg.endswith(".") and "\n" not in msg


def test_generate_and_stream_refuse_max_tokens_past_the_context(llm32):
    prompt = list(range(5, 29))  # 24 tokens: room for 8
    for call in (lambda p: llm32.generate([prompt], p), lambda p: list(llm32.stream(prompt, p)),
                 lambda p: llm32.generate([prompt], p, use_cache=False)):
        with pytest.raises(ValueError, match="max_tokens is 9 but the prompt has 24 tokens"):
            call(greedy(9))
    out = llm32.generate([prompt], greedy(8))[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"
    stats = llm32.stats()  # the refused requests left nothing behind
    assert stats["blocks_used"] == stats["running"] == stats["waiting"] == 0


def test_left_truncation_keeps_room_for_max_tokens(llm32_left):
    prompt = list(range(5, 35))  # 30 tokens
    out = llm32_left.generate([prompt], greedy(10))[0]
    assert out.prompt_token_ids == prompt[-22:] and len(out.token_ids) == 10  # 22 + 10 = the context
    with pytest.raises(MaxTokensTooLargeError):
        llm32_left.generate([prompt], greedy(CONTEXT))


def test_chat_session_refuses_max_tokens_past_the_context_and_keeps_its_history(llm32):
    s = llm32.session()
    with pytest.raises(MaxTokensTooLargeError):
        s.send("hi", greedy(CONTEXT))
    assert s.turns == 0 and s.messages == []
