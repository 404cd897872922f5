"""Bad input, limits and disconnects: OpenAI-style 4xx bodies, never a 5xx, blocks always freed."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest

from kvcache import SamplingParams
from tests.server.harness import MODEL_ID, start_server, tiny_server_llm, wait_for

MESSAGES = [{"role": "user", "content": "Tell me a story about the robot and the library."}]


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"n": 17}, "n"),
    ({"n": 0}, "n"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1.0}, "frequency_penalty"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"extra_body": {"top_k": -5}}, "top_k"),
    ({"extra_body": {"max_token": 5}}, "max_token"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
])
def test_bad_parameters_are_400_naming_the_param(client, kwargs, param):
    args = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**args)
    err = info.value.body
    assert info.value.status_code == 400 and err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert err["message"].endswith(".") and "\n" not in err["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-7", messages=MESSAGES, max_tokens=4)
    assert info.value.body["code"] == "model_not_found" and "gpt-7" in info.value.body["message"]


def test_max_tokens_past_the_context_is_the_apis_own_error(server):
    llm, ids = server.state.llm, [5, 6, 7, 8]
    limit = llm.max_model_len
    for max_tokens in (limit - len(ids) + 1, 100_000_000):
        r = httpx.post(server.v1 + "/completions", json={"model": MODEL_ID, "prompt": ids, "max_tokens": max_tokens})
        err = error_of(r)
        assert r.status_code == 400 and err["param"] == "max_tokens" and err["code"] == "context_length_exceeded"
        with pytest.raises(ValueError) as info:  # the same rule, word for word, in the Python API
            llm.generate([ids], SamplingParams(max_tokens=max_tokens))
        assert err["message"] == str(info.value)
    r = httpx.post(server.v1 + "/completions", json={"model": MODEL_ID, "prompt": ids, "max_tokens": limit - len(ids),
                                                     "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == limit - len(ids)


def test_prompt_longer_than_the_context(client, server):
    long_text = "the quick brown fox jumps over the lazy dog " * 200
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_ID, prompt=long_text, max_tokens=4)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_ID, prompt=[1, 2, 3, 10**9], max_tokens=4)  # id past the vocab
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_ID, prompt=["one", ""], max_tokens=4)  # an empty one


@pytest.mark.parametrize(("content", "expect"), [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"", "JSON body"),
    (b'{"model": "tiny", "messages": "hi"}', "messages"),
])
def test_invalid_bodies(server, content, expect):
    r = httpx.post(server.v1 + "/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert expect in error_of(r)["message"]


def test_body_too_large_is_413(server):
    big = {"model": MODEL_ID, "prompt": "x" * (server.state.config.max_body_bytes + 10)}
    r = httpx.post(server.v1 + "/completions", json=big)
    assert r.status_code == 413 and "larger than" in error_of(r)["message"]

    def chunks():  # no Content-Length: the cap applies while reading
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(server.state.config.max_body_bytes // 65536 + 2):
            yield b"y" * 65536
        yield b'"}'

    r = httpx.post(server.v1 + "/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and error_of(r)["type"] == "invalid_request_error"


def test_unknown_route_and_method(server):
    assert error_of(httpx.get(server.v1 + "/nothing"))["type"] == "not_found_error"
    r = httpx.get(server.v1 + "/chat/completions")
    assert r.status_code == 405 and error_of(r)


def _stream_and_hang_up(server, after_chunks: int) -> int:
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 200, "stream": True, "ignore_eos": True}
    seen = 0
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= after_chunks:
                break  # leaving the block closes the connection mid-stream
    return seen


def test_client_disconnect_mid_stream_frees_blocks(server):
    before = server.state.metrics.disconnects
    assert _stream_and_hang_up(server, 4) == 4
    stats = server.state.stats
    assert wait_for(lambda: stats()["blocks_used"] == 0 and stats()["running"] == 0, timeout=5), stats()
    assert wait_for(lambda: server.state.metrics.in_flight == 0)
    assert server.state.metrics.disconnects == before + 1
    assert httpx.get(server.url + "/health").status_code == 200


def test_many_disconnects_in_parallel(server):
    threads = [threading.Thread(target=_stream_and_hang_up, args=(server, 2 + i)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wait_for(lambda: server.state.stats()["blocks_used"] == 0, timeout=5), server.state.stats()


def test_non_stream_disconnect_aborts(server):
    """The engine is held for a moment so the client surely hangs up before the reply."""
    before = server.state.stats()["tokens_generated"], server.state.metrics.disconnects
    holding = threading.Thread(target=asyncio.run, args=(server.state.engine.call(lambda e: time.sleep(1.0)),))
    holding.start()
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.v1 + "/chat/completions", json=body, timeout=0.3)
    holding.join()
    assert wait_for(lambda: server.state.metrics.in_flight == 0, timeout=5)
    assert wait_for(lambda: server.state.stats()["blocks_used"] == 0, timeout=5), server.state.stats()
    assert server.state.stats()["tokens_generated"] - before[0] < 200  # aborted, not run to the end
    assert server.state.metrics.disconnects == before[1] + 1


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir, one_torch_thread, tmp_path_factory):
    srv = start_server(tiny_server_llm(tiny_model_dir, max_num_seqs=1), api_key="s3cret", max_queue=0,
                       sessions_dir=tmp_path_factory.mktemp("sessions"))
    yield srv
    srv.stop()


def test_api_key(keyed_server):
    bad = openai.OpenAI(base_url=keyed_server.v1, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.body["code"] == "invalid_api_key"
    assert httpx.get(keyed_server.url + "/metrics").status_code == 401
    assert httpx.get(keyed_server.url + "/health").status_code == 200  # liveness stays open
    good = openai.OpenAI(base_url=keyed_server.v1, api_key="s3cret", max_retries=0)
    assert good.models.list().data[0].id == MODEL_ID


def test_queue_full_is_429_with_retry_after(keyed_server):
    good = openai.OpenAI(base_url=keyed_server.v1, api_key="s3cret", max_retries=0)
    hold = good.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=200, stream=True,
                                        extra_body={"ignore_eos": True})
    next(iter(hold))  # one request in flight fills max_num_seqs=1 + max_queue=0
    with pytest.raises(openai.RateLimitError) as info:
        good.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=4)
    assert info.value.response.headers["retry-after"] == "1"
    assert info.value.body["type"] == "rate_limit_error"
    hold.close()
    assert wait_for(lambda: keyed_server.state.metrics.in_flight == 0)
    assert good.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=2).usage.completion_tokens >= 1
