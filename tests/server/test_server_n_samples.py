"""`n` and `best_of`: n choices per prompt in OpenAI's shapes, each equal to asking once with seed + index."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.harness import MODEL_ID

MESSAGES = [{"role": "user", "content": "Tell me about the robot and the library."}]
SEEDED = {"temperature": 0.9, "seed": 5, "max_tokens": 6, "extra_body": {"ignore_eos": True}}
PROMPTS = ["Once upon a time there was", "Stars are"]


def _chat_texts(client, n: int, stream: bool) -> tuple[list[str], list, object]:
    """(text per choice index, chunks or choices, usage)."""
    if not stream:
        r = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, n=n, **SEEDED)
        assert [c.index for c in r.choices] == list(range(n))
        return [c.message.content for c in r.choices], r.choices, r.usage
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, n=n, stream=True,
                                                 stream_options={"include_usage": True}, **SEEDED))
    texts, roles, finishes = [""] * n, set(), [None] * n
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            roles |= {ch.index} if ch.delta.role == "assistant" else set()
            finishes[ch.index] = ch.finish_reason or finishes[ch.index]
    assert roles == set(range(n)) and finishes == ["length"] * n
    assert chunks[-1].choices == []
    return texts, chunks, chunks[-1].usage


@pytest.mark.parametrize("stream", [False, True])
def test_chat_n_choices_equal_one_request_per_seed(client, server, stream):
    alone = [client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, **{**SEEDED, "seed": 5 + i})
             for i in range(3)]
    texts, _, usage = _chat_texts(client, 3, stream)
    assert texts == [a.choices[0].message.content for a in alone]
    assert len(set(texts)) > 1, "the seeds are meant to give different samples"
    # the prompt once, every sample's tokens
    assert usage.prompt_tokens == alone[0].usage.prompt_tokens and usage.completion_tokens == 18
    assert usage.total_tokens == usage.prompt_tokens + 18
    assert server.state.stats()["blocks_used"] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_completions_n_choices_per_prompt(client, server, stream):
    kwargs = dict(model=MODEL_ID, **SEEDED)
    alone = [[client.completions.create(prompt=p, **{**kwargs, "seed": 5 + j}).choices[0].text for j in range(2)]
             for p in PROMPTS]
    if stream:
        chunks = list(client.completions.create(prompt=PROMPTS, n=2, stream=True,
                                                stream_options={"include_usage": True}, **kwargs))
        texts = [""] * 4
        for c in chunks:
            for ch in c.choices:
                texts[ch.index] += ch.text
        usage = chunks[-1].usage
    else:
        r = client.completions.create(prompt=PROMPTS, n=2, **kwargs)
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        texts, usage = [c.text for c in r.choices], r.usage
    assert texts == [t for pair in alone for t in pair]  # prompt i's sample j is choice 2i + j
    ids = [server.state.llm.encode(p) for p in PROMPTS]
    assert usage.prompt_tokens == sum(len(i) for i in ids) and usage.completion_tokens == 4 * 6
    assert server.state.stats()["blocks_used"] == 0


def test_best_of_returns_the_samples_with_the_highest_total_logprob(client, server):
    kwargs = dict(model=MODEL_ID, prompt=PROMPTS[0], **SEEDED)
    every = client.completions.create(n=3, logprobs=0, **kwargs).choices
    totals = [sum(c.logprobs.token_logprobs) for c in every]
    best = sorted(range(3), key=lambda i: -totals[i])
    r = client.completions.create(n=2, best_of=3, **kwargs)
    assert [c.text for c in r.choices] == [every[i].text for i in best[:2]]
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].logprobs is None
    assert r.usage.completion_tokens == 3 * 6  # every sample generated counts
    with_lp = client.completions.create(n=1, best_of=3, logprobs=1, **kwargs).choices
    assert with_lp[0].text == every[best[0]].text and len(with_lp[0].logprobs.top_logprobs[0]) == 1
    assert server.state.stats()["blocks_used"] == 0


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"n": 17}, "n", "less than or equal to 16"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"n": 2, "best_of": 1}, "best_of", "best_of must be at least n (2), got 1."),
    ({"best_of": 17}, "best_of", "less than or equal to 16"),
    ({"best_of": 2, "stream": True}, "best_of", "cannot be streamed"),
])
def test_bad_n_and_best_of_are_400_in_one_sentence(server, body, param, says):
    r = httpx.post(server.v1 + "/completions", json={"model": MODEL_ID, "prompt": "hi", "max_tokens": 2, **body})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and says in err["message"], err
    assert err["message"].endswith(".") and "\n" not in err["message"] and err["message"].count(". ") == 0


def test_chat_n_17_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, n=17, max_tokens=2)
    assert info.value.body["param"] == "n" and info.value.body["message"].endswith(".")


def test_too_many_sequences_is_400(server):
    limit = server.state.llm.engine.config.max_num_seqs
    prompts = ["hi"] * (limit // 16 + 1)
    r = httpx.post(server.v1 + "/completions", json={"model": MODEL_ID, "prompt": prompts, "n": 16, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "prompts x samples" in r.json()["error"]["message"]
