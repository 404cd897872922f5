"""What real clients send besides generation parameters: stream_options extras, a model's card,
content parts of other types."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.harness import MODEL_ID

MESSAGES = [{"role": "user", "content": "Tell me a story about the moon."}]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_continuous_usage_stats_puts_usage_on_every_chunk(client, endpoint):
    options = {"include_usage": True, "continuous_usage_stats": True, "some_future_option": 1}
    kwargs = dict(model=MODEL_ID, max_tokens=5, temperature=0.0, stream=True, stream_options=options,
                  extra_body={"ignore_eos": True})
    if endpoint == "chat":
        chunks = list(client.chat.completions.create(messages=MESSAGES, **kwargs))
    else:
        chunks = list(client.completions.create(prompt="Once upon a time", **kwargs))
    assert chunks and all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 5 and counts[0] <= 1
    prompt = chunks[-1].usage.prompt_tokens
    assert all(c.usage.prompt_tokens == prompt and c.usage.total_tokens == prompt + c.usage.completion_tokens
               for c in chunks)
    assert chunks[-1].choices == []
    plain = list(client.chat.completions.create(messages=MESSAGES, model=MODEL_ID, max_tokens=2, stream=True,
                                                stream_options={"include_usage": True}))
    assert all(c.usage is None for c in plain[:-1]) and plain[-1].usage.completion_tokens == 2


def test_model_card_and_unknown_model(client, server):
    card = client.models.retrieve(MODEL_ID)
    assert card.id == MODEL_ID and card.object == "model"
    r = httpx.get(server.v1 + "/models/gpt-7")
    err = r.json()["error"]
    assert r.status_code == 404 and err["code"] == "model_not_found" and "gpt-7" in err["message"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "not_found_error"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("org/other-model")


def test_image_part_is_one_clear_400(client):
    content = [{"type": "text", "text": "What is in this picture?"},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": content}], max_tokens=2)
    err = info.value.body
    assert err["message"] == "Image inputs are not supported by this text model (messages.0.content.1)."
    assert err["param"] == "messages.0.content.1.type"
    audio = [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": audio}], max_tokens=2)
    assert "'input_audio'" in info.value.body["message"]
    parts = [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story."}]
    ok = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": parts}], max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.BadRequestError):  # a text part without its text is still refused
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": [{"type": "text"}]}],
                                       max_tokens=2)
