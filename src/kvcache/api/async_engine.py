"""`AsyncEngine`: the continuous-batching engine for asyncio callers (the server).

One background thread owns the `LLMEngine` and steps it while there is work; asyncio code
adds requests and aborts them through a command queue, and receives each request's
outputs on its own asyncio queue. Requests that arrive while others run join the running
batch at the next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

from kvcache.engine.engine import LLMEngine
from kvcache.engine.outputs import RequestOutput
from kvcache.engine.sampling import SamplingParams
from kvcache.errors import KVCacheError

T = TypeVar("T")


@dataclass
class StreamOutput:
    """One update of one sample of a request: the new text since its last update, and its output
    so far (`index`: which of the request's n samples)."""

    request_id: str
    delta: str
    finished: bool
    output: RequestOutput
    index: int = 0


class AsyncEngine:
    """Runs `llm.engine` on a background thread; `add_request` gives an async iterator."""

    def __init__(self, llm):
        self.llm, self.engine = llm, llm.engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="kvcache-engine", daemon=True)
        self._thread.start()

    # -- called from asyncio ------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> AsyncIterator[StreamOutput]:
        """Queue a prompt (text or ids); iterate the result for its outputs as they come.

        Bad input raises `KVCacheError` here, before anything is queued. Leaving the
        iteration early (or the task being cancelled) aborts the request and frees its blocks.
        With `params.n` > 1 the updates of its n samples come interleaved, each with its
        `index`; the iteration ends once all n finished.
        """
        ids, plist = self.llm.preprocess([prompt], params)
        rid = request_id or uuid.uuid4().hex
        if rid in self._streams:
            raise KVCacheError(f"Request id '{rid}' is already in use.")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), q)
        self._commands.put(("add", rid, ids[0], plist[0], None))
        self._wake.set()
        return self._iterate(rid, q, plist[0].n)

    async def _iterate(self, rid: str, q: asyncio.Queue, n: int) -> AsyncIterator[StreamOutput]:
        left = n  # samples not finished yet
        try:
            while left:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                left -= item.finished
                yield item
        finally:
            if left:
                await self.abort(rid)

    async def abort(self, request_id: str) -> None:
        """Stop a request; returns once the engine has freed its blocks."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("abort", request_id, None, None, done))
        self._wake.set()
        await asyncio.wrap_future(done)

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` on the engine thread between two steps and return its result
        (its exception is raised here): for reads and changes that must not race a step,
        e.g. saving or restoring a session's blocks."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", "", fn, None, done))
        self._wake.set()
        return await asyncio.wrap_future(done)

    def stats(self) -> dict:
        """The engine's figures (blocks, hit rate, running/waiting, preemptions)."""
        return self.engine.stats()

    def shutdown(self) -> None:
        """Stop the engine thread (pending requests are dropped)."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    # -- the engine thread ---------------------------------------------------------------
    def _deliver(self, rid: str, item) -> None:
        target = self._streams.get(rid)
        if target is None:
            return
        loop, q = target
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed
            self._streams.pop(rid, None)

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, rid, payload, params, done = self._commands.get_nowait()  # payload: ids, or a function
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.add_request(payload, params, request_id=rid, eos_ids=self.llm.eos_ids)
                except Exception as exc:  # e.g. a duplicate id: fail this request alone
                    self._deliver(rid, exc)
                    self._streams.pop(rid, None)
            elif kind == "call":
                if done.set_running_or_notify_cancel():  # a cancelled caller's function is not run
                    try:
                        done.set_result(payload(self.engine))
                    except Exception as exc:
                        done.set_exception(exc)
            else:
                self.engine.abort(rid)
                self._streams.pop(rid, None)
                _resolve(done, None)

    def _run(self) -> None:
        while not self._stop:
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                outs = self.engine.step()
            except Exception as exc:  # keep serving: fail the requests in flight, not the process
                for rid in list(self._streams):
                    self._deliver(rid, exc)
                    self.engine.abort(rid)
                self._streams.clear()
                continue
            done = set()  # requests whose every sample finished: their streams close after this step's updates
            for o in outs:
                req = o.request
                rid = req.group_id
                if o.text or o.finished:
                    self._deliver(rid, StreamOutput(rid, o.text, o.finished, req.to_output(), req.index))
                if o.finished and all(r.finished for r in req.group):
                    done.add(rid)
            for rid in done:
                self._streams.pop(rid, None)


def _resolve(done: concurrent.futures.Future, value) -> None:
    """Set a command's result unless its awaiting task was cancelled (a disconnected client):
    setting a cancelled future raises, which must never stop the engine thread."""
    if done.set_running_or_notify_cancel():
        done.set_result(value)
