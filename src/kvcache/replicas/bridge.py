"""An HTTP request run through an ASGI app in this process, its response given back as messages.

A replica answers the ingress this way: the single server's app handles the request exactly as
it would over a socket (routes, errors, limits), and its response start and body chunks go back
one by one, so streams stay streams. Closing the iterator early is a client disconnect: the app
sees `http.disconnect`, which aborts its engine request and frees its blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class HTTPRequest:
    """What the ingress forwards: enough of an HTTP request to rebuild its ASGI scope."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


@dataclass
class ResponseStart:
    """The first message of a response: status, headers, and which replica answers."""

    status: int
    headers: list[tuple[bytes, bytes]]
    replica: str = ""


def _scope(req: HTTPRequest) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": req.method, "scheme": "http", "path": req.path, "raw_path": req.path.encode(),
            "root_path": "", "query_string": req.query_string, "headers": list(req.headers),
            "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 0)}


async def exchange(app, req: HTTPRequest, replica: str = "") -> AsyncIterator[ResponseStart | bytes]:
    """Run `req` through `app`: a ResponseStart, then the body's chunks (bytes) as the app sends them."""
    out: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    sent_body = [False]

    async def receive() -> dict:
        if not sent_body[0]:
            sent_body[0] = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await out.put(message)

    async def run() -> None:
        try:
            await app(_scope(req), receive, send)
        finally:
            await out.put(None)

    task = asyncio.ensure_future(run())
    try:
        while True:
            message = await out.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], [tuple(h) for h in message.get("headers", [])], replica)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
        await task
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=5)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - the app logged its own failure
                task.cancel()
