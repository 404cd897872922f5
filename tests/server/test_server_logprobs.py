"""Logprobs over HTTP in OpenAI's shapes: chat and completions, streamed and not, through the openai client."""

from __future__ import annotations

import httpx
import pytest

from kvcache import SamplingParams
from tests.server.harness import MODEL_ID

MESSAGES = [{"role": "user", "content": "Tell me a story about the moon and the deep blue sea."}]
PROMPT = "Once upon a time there was a robot who"
GREEDY = {"temperature": 0.0}
LONG = {"ignore_eos": True}


def engine_logprobs(llm, ids, n, k):
    """The Python API's answer, from another LLM on the same weights (the server's engine runs on its own thread)."""
    return llm.generate([ids], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=k))[0]


def test_chat_logprobs_match_the_engine(client, tiny_llm):
    llm = tiny_llm
    r = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=5, logprobs=True,
                                       top_logprobs=3, extra_body=LONG, **GREEDY)
    content = r.choices[0].logprobs.content
    want = engine_logprobs(llm, llm.chat_ids(MESSAGES), 5, 3)
    assert len(content) == 5
    for got, entry in zip(content, want.logprobs):
        assert got.token == llm.tokenizer.decode([entry.token_id])
        assert got.bytes == list(got.token.encode())
        assert got.logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert [t.logprob for t in got.top_logprobs] == pytest.approx([lp for _, lp in entry.top], abs=1e-5)
        assert len(got.top_logprobs) == 3 and got.top_logprobs[0].logprob >= got.logprob - 1e-6
    assert "".join(t.token for t in content) == r.choices[0].message.content
    plain = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=2, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs_streamed_equal_non_streamed(client):
    kwargs = dict(model=MODEL_ID, messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=2,
                  extra_body=LONG, **GREEDY)
    full = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in full]
    no_lp = list(client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=2, stream=True))
    assert all(c.choices[0].logprobs is None for c in no_lp if c.choices)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_shape(client, tiny_llm, stream):
    llm = tiny_llm
    kwargs = dict(model=MODEL_ID, prompt=PROMPT, max_tokens=5, logprobs=2, extra_body=LONG, **GREEDY)
    if stream:
        chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs) if c.choices]
        text = "".join(c.text for c in chunks)
        tokens, lps, tops, offsets = [], [], [], []
        for c in chunks:
            if c.logprobs:
                tokens += c.logprobs.tokens
                lps += c.logprobs.token_logprobs
                tops += c.logprobs.top_logprobs
                offsets += c.logprobs.text_offset
    else:
        choice = client.completions.create(**kwargs).choices[0]
        text, lp = choice.text, choice.logprobs
        tokens, lps, tops, offsets = lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset
    want = engine_logprobs(llm, llm.encode(PROMPT), 5, 2)
    assert tokens == [llm.tokenizer.decode([t]) for t in want.token_ids]
    assert lps == pytest.approx([e.logprob for e in want.logprobs], abs=1e-5)
    assert all(len(t) <= 2 and max(t.values()) >= lp - 1e-6 for t, lp in zip(tops, lps))
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    assert text == "".join(tokens)


def test_completion_logprobs_bad_values_are_400(server):
    for value in (6, -1):
        r = httpx.post(server.v1 + "/completions", json={"model": MODEL_ID, "prompt": PROMPT, "logprobs": value})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


def test_echo_with_max_tokens_0_scores_the_prompt(client, tiny_llm):
    """What lm-eval's loglikelihood sends: the prompt back with its own logprobs, nothing generated."""
    ids = tiny_llm.encode(PROMPT)
    r = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    choice = r.choices[0]
    want = tiny_llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=1))[0].prompt_logprobs
    assert choice.text == PROMPT and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert lp.tokens == [tiny_llm.tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([e.logprob for e in want[1:]], abs=1e-5)
    assert all(len(t) == 1 for t in lp.top_logprobs[1:])
    by_ids = client.completions.create(model=MODEL_ID, prompt=[ids], max_tokens=0, echo=True, logprobs=0)
    assert by_ids.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert by_ids.choices[0].logprobs.top_logprobs[1:] == [{}] * (len(ids) - 1)


@pytest.mark.parametrize("stream", [False, True])
def test_echo_puts_the_prompt_first(client, stream):
    kwargs = dict(model=MODEL_ID, prompt=PROMPT, max_tokens=4, logprobs=2, extra_body=LONG, **GREEDY)
    plain = client.completions.create(**kwargs).choices[0]
    if stream:
        chunks = [c.choices[0] for c in client.completions.create(stream=True, echo=True, **kwargs) if c.choices]
        text = "".join(c.text for c in chunks)
        lps = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
        offsets = [v for c in chunks if c.logprobs for v in c.logprobs.text_offset]
    else:
        echoed = client.completions.create(echo=True, **kwargs).choices[0]
        text, lps, offsets = echoed.text, echoed.logprobs.token_logprobs, echoed.logprobs.text_offset
    assert text == PROMPT + plain.text
    n_prompt = len(lps) - 4
    assert lps[0] is None and None not in lps[1:]
    assert lps[n_prompt:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-6)
    assert offsets == sorted(offsets) and offsets[0] == 0
    no_lp = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=2, echo=True).choices[0]
    assert no_lp.text.startswith(PROMPT) and no_lp.logprobs is None


def test_max_tokens_0_needs_echo(server):
    r = httpx.post(server.v1 + "/completions", json={"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert "echo" in r.json()["error"]["message"]
