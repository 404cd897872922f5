"""Structured output over HTTP: response_format, tools / tool_choice, /tokenize and /detokenize,
through the openai client on the tiny model."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.server.harness import MODEL_ID, start_server, tiny_server_llm

MESSAGES = [{"role": "user", "content": "Tell me about a person."}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0,
                                                                       "maximum": 120}},
    "required": ["name", "age"], "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
GREEDY = {"temperature": 0.0, "max_tokens": 60}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory, one_torch_thread):
    """The test server with room for tool descriptions (the tiny tokenizer spends a token a
    character on JSON, more than the model's 256 positions)."""
    srv = start_server(tiny_server_llm(tiny_model_dir, max_model_len=1024),
                       sessions_dir=tmp_path_factory.mktemp("sessions"))
    yield srv
    srv.stop()


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_json_schema_reply_parses_and_validates(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, response_format=schema_format(PERSON),
                                       **GREEDY)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_schema_streamed_equals_whole(client):
    kwargs = dict(model=MODEL_ID, messages=MESSAGES, response_format=schema_format(PERSON), **GREEDY)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    assert streamed == whole


def test_json_object_and_completions(client):
    """json_object: any object (the random model's keys may run to max_tokens, not on this prompt)."""
    c = client.completions.create(model=MODEL_ID, prompt="Numbers are fun too: one, two", extra_body={
        "response_format": {"type": "json_object"}}, **GREEDY)
    assert c.choices[0].finish_reason == "stop" and isinstance(json.loads(c.choices[0].text), dict)
    c = client.completions.create(model=MODEL_ID, prompt="A person:", extra_body={
        "response_format": schema_format(PERSON)}, **GREEDY)
    jsonschema.validate(json.loads(c.choices[0].text), PERSON)


def test_sdk_parse_gives_the_pydantic_object(client):
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=8)
        age: int = Field(ge=0, le=120)

    r = client.chat.completions.parse(model=MODEL_ID, messages=MESSAGES, response_format=Person, **GREEDY)
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 120


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_tool_calls_name_an_allowed_function(client, choice):
    r = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, tools=[WEATHER, TIME], tool_choice=choice,
                                       **GREEDY)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    allowed = {"get_time"} if isinstance(choice, dict) else {"get_weather", "get_time"}
    assert call.function.name in allowed
    spec = WEATHER if call.function.name == "get_weather" else TIME
    jsonschema.validate(json.loads(call.function.arguments), spec["function"]["parameters"])


def test_tool_calls_streamed(client):
    kwargs = dict(model=MODEL_ID, messages=MESSAGES, tools=[WEATHER], tool_choice="required", **GREEDY)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    deltas = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [
        (0, whole.function.name, whole.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


def test_tools_are_shown_to_a_template_without_tool_support(server):
    """The tiny model's ChatML template ignores `tools`: they go into the system message."""
    from kvcache.server.routes import chat_prompt_ids
    from kvcache.server.schemas import ChatCompletionRequest
    from kvcache.server.structured import template_renders_tools, tool_plan

    llm = server.state.llm
    assert not template_renders_tools(llm.tokenizer)
    body = ChatCompletionRequest(model=MODEL_ID, messages=MESSAGES, tools=[WEATHER], tool_choice="required")
    text = llm.tokenizer.decode(chat_prompt_ids(llm, body, tool_plan(body.tools, body.tool_choice, False)))
    assert "get_weather" in text and text.index("get_weather") < text.index("Tell me about")


def test_tool_choice_none_ignores_tools_and_history_with_calls_renders(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, tools=[WEATHER], tool_choice="none",
                                       max_tokens=4, temperature=0.0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason != "tool_calls"
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = client.chat.completions.create(model=MODEL_ID, messages=history, max_tokens=4, temperature=0.0)
    assert r.choices[0].finish_reason in ("stop", "length")


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30)


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "xml"}}, "response_format.type", "'xml' is not supported"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format", "The JSON schema cannot be used"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "must be a JSON schema object"),
    ({"tools": [WEATHER]}, "tool_choice", "'auto' needs a chat template that renders tools"),
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice", "'auto' needs a chat template"),
    ({"tool_choice": "required"}, "tool_choice", "needs a non-empty 'tools' list"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "'nope', which is not in tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}], "tool_choice": "required"},
     "tools.0.function.name", "must be 1-64"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
      "tool_choice": "required"}, "tools", "The JSON schema cannot be used"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "cannot be combined"),
])
def test_bad_structured_requests_are_one_sentence_400s(server, body, param, words):
    r = _post(server, "/v1/chat/completions", {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"]
    assert "\n" not in err["message"] and err["message"].endswith(".")
    assert server.state.stats()["running"] == 0


def test_the_openai_client_gets_a_400_for_a_schema_that_does_not_compile(client):
    with pytest.raises(openai.BadRequestError, match="The JSON schema cannot be used"):
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=4,
                                       response_format=schema_format({"type": "object", "properties": 3}))


def test_tokenize_detokenize_round_trip(server):
    llm = server.state.llm
    text = "The quick brown fox jumps over the lazy dog."
    r = _post(server, "/tokenize", {"model": MODEL_ID, "prompt": text}).json()
    assert r["tokens"] == llm.encode(text) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == llm.max_model_len and r["token_strs"] is None
    assert _post(server, "/detokenize", {"model": MODEL_ID, "tokens": r["tokens"]}).json() == {"prompt": text}
    chat = _post(server, "/tokenize", {"messages": MESSAGES, "return_token_strs": True}).json()
    assert chat["tokens"] == llm.chat_ids(MESSAGES) and len(chat["token_strs"]) == chat["count"]


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": MESSAGES}, "prompt"),
    ("/detokenize", {"tokens": [1, 10 ** 6]}, "tokens.1"),
    ("/detokenize", {"tokens": [-1]}, "tokens.0"),
])
def test_bad_token_requests_are_400s(server, path, body, param):
    r = _post(server, path, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert "\n" not in r.json()["error"]["message"]


def test_token_endpoints_check_the_model(server):
    r = _post(server, "/detokenize", {"model": "other", "tokens": [5]})
    assert r.status_code == 404


def test_tokenizer_info_names_the_special_tokens_and_template(server):
    """vLLM's /tokenizer_info, which lm-eval's `local-completions` probes before using /tokenize."""
    tok = server.state.llm.tokenizer
    r = httpx.get(server.url + "/tokenizer_info", timeout=30)
    assert r.status_code == 200
    info = r.json()
    assert info["eos_token"] == "<|im_end|>" and info["pad_token"] == "<|endoftext|>" and info["bos_token"] is None
    assert info["chat_template"] == tok.chat_template and info["tokenizer_class"] == type(tok).__name__
    assert info["model_max_length"] == server.state.llm.max_model_len
    assert server.state.metrics.requests[("/tokenizer_info", 200)] == 1


TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\nTools: ' }}{% for t in tools %}{{ t['function']['name'] + ' ' }}"
    "{% endfor %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tools_server(tiny_model_dir, tmp_path_factory, one_torch_thread):
    """The tiny model with a chat template that renders tools."""
    import shutil

    from tests.conftest import build_tokenizer

    folder = tmp_path_factory.mktemp("tiny-tools")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, folder / name)
    tok = build_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE
    tok.save_pretrained(folder)
    srv = start_server(tiny_server_llm(folder, max_model_len=1024), sessions_dir=tmp_path_factory.mktemp("s"))
    yield srv
    srv.stop()


def test_auto_where_the_template_renders_tools(tools_server):
    from kvcache.server.structured import template_renders_tools, tool_plan

    llm = tools_server.state.llm
    assert template_renders_tools(llm.tokenizer)
    client = openai.OpenAI(base_url=tools_server.v1, api_key="unused", max_retries=0, timeout=60)
    r = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, tools=[WEATHER], max_tokens=8,
                                       temperature=0.0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content  # the model chose text
    forced = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, tools=[WEATHER],
                                            tool_choice="required", **GREEDY)
    assert forced.choices[0].message.tool_calls[0].function.name == "get_weather"
    from kvcache.server.routes import chat_prompt_ids
    from kvcache.server.schemas import ChatCompletionRequest

    body = ChatCompletionRequest(model=MODEL_ID, messages=MESSAGES, tools=[WEATHER])
    shown = llm.tokenizer.decode(chat_prompt_ids(llm, body, tool_plan(body.tools, None, True)))
    assert "Tools: get_weather" in shown and "You can call" not in shown  # the template's, not ours


def test_auto_replies_parse_tool_call_blocks():
    from kvcache.server.structured import tool_calls, tool_plan

    plan = tool_plan([WEATHER], "auto", True)
    text = 'Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}</tool_call>'
    (call,) = tool_calls(text, plan)
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Rome", "days": 2}'}
    assert tool_calls("no call here", plan) is None
    assert tool_calls('<tool_call>{"name": "other", "arguments": {}}</tool_call>', plan) is None
