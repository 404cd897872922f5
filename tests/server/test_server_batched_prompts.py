"""Several prompts in one completions request: one choice each, equal to asking for them one by one."""

from __future__ import annotations

import httpx
import pytest

from tests.server.harness import MODEL_ID

PROMPTS = ["Once upon a time there was", "The robot went to the library and", "Stars are"]
GREEDY = {"temperature": 0.0}
LONG = {"ignore_eos": True}


@pytest.mark.parametrize("stream", [False, True])
def test_each_prompt_is_its_own_choice(client, server, stream):
    kwargs = dict(model=MODEL_ID, max_tokens=5, extra_body=LONG, **GREEDY)
    alone = [client.completions.create(prompt=p, **kwargs) for p in PROMPTS]
    ids = [server.state.llm.encode(p) for p in PROMPTS]
    for prompt in (PROMPTS, ids):  # strings, or token-id lists
        if stream:
            chunks = list(client.completions.create(prompt=prompt, stream=True,
                                                    stream_options={"include_usage": True}, **kwargs))
            texts, finishes = [""] * len(PROMPTS), [None] * len(PROMPTS)
            for c in chunks:
                for ch in c.choices:
                    texts[ch.index] += ch.text
                    finishes[ch.index] = ch.finish_reason or finishes[ch.index]
            usage = chunks[-1].usage
            assert chunks[-1].choices == [] and finishes == ["length"] * len(PROMPTS)
        else:
            r = client.completions.create(prompt=prompt, **kwargs)
            assert [c.index for c in r.choices] == list(range(len(PROMPTS)))
            texts, usage = [c.text for c in r.choices], r.usage
        assert texts == [a.choices[0].text for a in alone]
        assert usage.prompt_tokens == sum(len(i) for i in ids) and usage.completion_tokens == 5 * len(PROMPTS)
    assert server.state.stats()["blocks_used"] == 0


def test_batched_loglikelihood_requests(client, server):
    """lm-eval's `--batch_size 4`: token-id prompts, echo, max_tokens 0, logprobs 1, in one request."""
    ids = [server.state.llm.encode(p) for p in PROMPTS]
    alone = [client.completions.create(model=MODEL_ID, prompt=i, max_tokens=0, echo=True, logprobs=1)
             for i in ids]
    r = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for got, want in zip(r.choices, alone):
        assert got.text == want.choices[0].text
        assert got.logprobs.token_logprobs == pytest.approx(want.choices[0].logprobs.token_logprobs, abs=1e-6)


def test_too_many_prompts_is_400(server):
    n = server.state.llm.engine.config.max_num_seqs + 1
    r = httpx.post(server.v1 + "/completions", json={"model": MODEL_ID, "prompt": ["hi"] * n, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_leaving_a_batched_stream_frees_every_prompts_blocks(server):
    from tests.server.harness import wait_for

    body = {"model": MODEL_ID, "prompt": PROMPTS, "max_tokens": 60, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.v1 + "/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        assert server.state.stats()["running"] + server.state.stats()["waiting"] > 0
    assert wait_for(lambda: server.state.stats()["blocks_used"] == 0 and server.state.metrics.in_flight == 0)
