"""AsyncEngine additions the server relies on: `call` on the engine thread, cancelled waits."""

from __future__ import annotations

import asyncio

import pytest

from kvcache import SamplingParams
from kvcache.api.async_engine import AsyncEngine

LONG = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)


@pytest.fixture()
def engine(tiny_llm, one_torch_thread):
    eng = AsyncEngine(tiny_llm)
    yield eng
    eng.shutdown()


def test_call_runs_on_the_engine_thread_and_raises_there(engine):
    async def main():
        blocks = await engine.call(lambda e: e.kv.num_blocks)
        with pytest.raises(ZeroDivisionError):
            await engine.call(lambda e: 1 / 0)
        return blocks

    assert asyncio.run(main()) == engine.engine.kv.num_blocks


def test_a_cancelled_abort_or_call_does_not_stop_the_engine(engine):
    """A client that disconnects cancels the task awaiting abort(); the engine thread must live on."""

    async def main():
        stream = engine.add_request("Once upon a time", LONG, request_id="r1")
        await stream.__anext__()
        for coro in (engine.abort("r1"), engine.call(lambda e: None)):
            task = asyncio.ensure_future(coro)
            await asyncio.sleep(0)
            task.cancel()
        await asyncio.sleep(0.1)
        return await asyncio.wait_for(last_update(), timeout=20)  # a dead engine thread would hang here

    async def last_update():
        async for update in engine.add_request("The little robot", SamplingParams(max_tokens=5, temperature=0.0)):
            pass
        return update

    last = asyncio.run(main())
    assert last.finished and engine._thread.is_alive()
    assert engine.stats()["blocks_used"] == 0
