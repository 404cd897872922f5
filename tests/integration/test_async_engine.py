"""AsyncEngine on the tiny model: concurrent requests, late joiners, abort, bad input."""

from __future__ import annotations

import asyncio

import pytest

from kvcache import KVCacheError, SamplingParams
from kvcache.api.async_engine import AsyncEngine

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = ["Once upon a time", "The little robot", "What is the capital", "read a book"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on the tiny model with one torch thread."""


@pytest.fixture()
def engine(tiny_llm):
    eng = AsyncEngine(tiny_llm)
    yield eng
    eng.shutdown()


async def _collect(engine, prompt, params, request_id=None):
    text, last = "", None
    async for update in engine.add_request(prompt, params, request_id=request_id):
        text += update.delta
        last = update
    return text, last


def test_concurrent_requests_equal_generate(engine, tiny_llm):
    want = tiny_llm.generate(PROMPTS, GREEDY)

    async def main():
        return await asyncio.gather(*[_collect(engine, p, GREEDY) for p in PROMPTS])

    got = asyncio.run(main())
    for (text, last), ref in zip(got, want):
        assert last.finished and last.output.token_ids == ref.token_ids
        assert text == ref.text == last.output.text
    assert engine.stats()["blocks_used"] == 0


def test_late_request_joins_the_running_batch(engine, tiny_llm):
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    want_late = tiny_llm.generate([PROMPTS[1]], GREEDY)[0].token_ids

    async def main():
        first = asyncio.create_task(_collect(engine, PROMPTS[0], long))
        await asyncio.sleep(0.05)
        late = await _collect(engine, PROMPTS[1], GREEDY)
        assert not first.done() or len((await first)[1].output.token_ids) == 40
        return late, await first

    (late_text, late_last), (_, first_last) = asyncio.run(main())
    assert late_last.output.token_ids == want_late
    assert len(first_last.output.token_ids) == 40


def test_abort_frees_blocks_at_once(engine):
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def main():
        updates = 0
        stream = engine.add_request(PROMPTS[2], long, request_id="to-abort")
        async for _ in stream:
            updates += 1
            if updates == 3:
                break
        await stream.aclose()  # leaving early aborts and waits for the engine to free the blocks
        return updates

    assert asyncio.run(main()) == 3
    s = engine.stats()
    assert s["blocks_used"] == 0 and s["running"] == 0 and s["waiting"] == 0


def test_bad_input_raises_before_queueing(engine):
    async def main():
        with pytest.raises(KVCacheError):
            engine.add_request("", GREEDY)
        with pytest.raises(KVCacheError):
            engine.add_request([10**9], GREEDY)

    asyncio.run(main())
    assert engine.stats()["waiting"] == 0


def test_duplicate_request_id_is_refused_and_the_first_continues(engine):
    async def main():
        first = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
                                   request_id="same")
        with pytest.raises(KVCacheError):
            engine.add_request(PROMPTS[1], GREEDY, request_id="same")
        outs = [u async for u in first]
        return outs[-1]

    last = asyncio.run(main())
    assert last.finished and len(last.output.token_ids) == 30
