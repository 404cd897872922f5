"""The server through the real `openai` client: chat and completions, streamed or not, usage, stops."""

from __future__ import annotations

import httpx
import pytest

from tests.server.harness import MODEL_ID

GREEDY = {"temperature": 0.0}
LONG = {"ignore_eos": True}  # extra: the tiny model's replies run to max_tokens
MESSAGES = [{"role": "system", "content": "You are a small robot who loves books about the stars."},
            {"role": "user", "content": "Tell me a story about the moon and the deep blue sea."}]


def metric(server, name: str) -> float:
    """One unlabelled value from /metrics."""
    text = httpx.get(server.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_chat_non_stream_usage_and_text(client, server):
    r = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=12, extra_body=LONG, **GREEDY)
    prompt_ids = server.state.llm.chat_ids(MESSAGES)
    assert r.object == "chat.completion" and r.model == MODEL_ID and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == len(prompt_ids) + 12
    again = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=1, **GREEDY)
    bs = 16  # the engine's block size: every full block of the prompt but the one with its last token
    assert again.usage.prompt_tokens_details.cached_tokens == bs * ((len(prompt_ids) - 1) // bs) > 0
    want = server.state.llm.tokenizer.decode(
        server.state.llm.generate([prompt_ids], _greedy_params(12))[0].token_ids, skip_special_tokens=True)
    assert choice.message.content == want


def _greedy_params(n):
    from kvcache import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_chat_stream_equals_non_stream_and_ends_with_usage(client):
    kwargs = dict(model=MODEL_ID, messages=MESSAGES, max_tokens=10, extra_body=LONG, **GREEDY)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format_ends_with_done(server):
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 4, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_completions_text_and_token_ids(client, server):
    llm = server.state.llm
    ids = llm.encode("Once upon a time there was")
    by_text = client.completions.create(model=MODEL_ID, prompt="Once upon a time there was", max_tokens=8,
                                        extra_body=LONG, **GREEDY)
    by_ids = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=8, extra_body=LONG, **GREEDY)
    assert by_text.object == "text_completion"
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids) and by_text.usage.completion_tokens == 8
    streamed = client.completions.create(model=MODEL_ID, prompt=[ids], max_tokens=8, stream=True,
                                         extra_body=LONG, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == by_text.choices[0].text


def test_resent_history_reports_cached_tokens(client):
    """Turn 2 resends turn 1 and its reply: the prefix cache serves those blocks."""
    first = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=8, **GREEDY)
    history = MESSAGES + [{"role": "assistant", "content": first.choices[0].message.content},
                          {"role": "user", "content": "And what did the librarian say?"}]
    second = client.chat.completions.create(model=MODEL_ID, messages=history, max_tokens=8, **GREEDY)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens >= 32
    assert cached >= 16 * (first.usage.prompt_tokens // 16) - 16 and cached % 16 == 0 and cached > 0


def test_stop_string_cuts_the_reply(client):
    kwargs = dict(model=MODEL_ID, messages=MESSAGES, max_tokens=24, extra_body=LONG, **GREEDY)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    words = [w for w in full.split() if len(w) >= 2]
    assert words, f"the tiny model said nothing usable: {full!r}"
    stop = words[len(words) // 2]
    cut = client.chat.completions.create(stop=[stop], **kwargs).choices[0]
    assert cut.message.content == full[: full.index(stop)]
    assert cut.finish_reason == "stop"
    streamed = client.chat.completions.create(stop=stop, stream=True, **kwargs)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut.message.content


def test_models_health_and_metrics(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    for name in ("kvcache_kv_blocks_total", "kvcache_kv_blocks_used", "kvcache_kv_blocks_cached",
                 "kvcache_prefix_cache_hit_rate", "kvcache_requests_running", "kvcache_requests_waiting",
                 "kvcache_generation_tokens_per_second", "kvcache_preemptions_total", "kvcache_requests_total",
                 "process_resident_memory_bytes", "kvcache_weights_info", "kvcache_weight_bytes"):
        assert f"# TYPE {name} " in text, name
    assert 'kvcache_weights_info{quantization="none"} 1' in text
    assert 'kvcache_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert metric(server, "kvcache_kv_blocks_total") == server.state.stats()["blocks_total"]


@pytest.mark.parametrize("stream", [False, True])
def test_seeded_sampling_is_reproducible(client, stream):
    kwargs = dict(model=MODEL_ID, messages=MESSAGES, max_tokens=8, temperature=0.9, top_p=0.9, seed=7,
                  extra_body={"top_k": 50, **LONG})
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    if stream:
        b = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs))
    else:
        b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b
