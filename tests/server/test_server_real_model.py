"""The server on the real default model (SmolLM2-135M-Instruct) through the `openai` client."""

from __future__ import annotations

import openai
import pytest

from tests.server.harness import MODEL_ID, start_server

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    import kvcache

    llm = kvcache.LLM("smollm2-135m-instruct", dtype="float32", kv_cache_memory="64MiB", progress=False)
    srv = start_server(llm, sessions_dir=tmp_path_factory.mktemp("sessions"))
    yield srv
    srv.stop()


@pytest.fixture()
def real_client(real_server):
    return openai.OpenAI(base_url=real_server.v1, api_key="unused", max_retries=0, timeout=120)


def test_real_chat_answers_and_reuses_the_history(real_client, real_server):
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."},
                {"role": "user", "content": "What is the capital of France?"}]
    first = real_client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=24, temperature=0)
    answer = first.choices[0].message.content
    assert "Paris" in answer
    want = real_server.state.llm.chat(messages, _greedy(24)).text
    assert answer == want  # the server's batch path equals the facade
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Italy?"}]
    stream = real_client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Rome" in text
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens >= 16 * ((first.usage.prompt_tokens - 1) // 16)
    assert real_server.state.stats()["blocks_used"] == 0


def test_real_completion_with_stop(real_client):
    r = real_client.completions.create(model=MODEL_ID, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0,
                                       stop=[" 7"])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text.startswith(" 5, 6,")
    assert " 7" not in r.choices[0].text


def _greedy(n):
    from kvcache import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0)


def test_real_json_schema_chat_is_schema_valid(real_client):
    import json

    import jsonschema

    schema = {"type": "object", "properties": {
        "city": {"type": "string"}, "country": {"type": "string"},
        "landmarks": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3}},
        "required": ["city", "country", "landmarks"], "additionalProperties": False}
    r = real_client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Describe Paris as JSON: city, country, landmarks."}],
        max_tokens=120, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    reply = json.loads(choice.message.content)
    jsonschema.validate(reply, schema)
    assert "Paris" in reply["city"]
