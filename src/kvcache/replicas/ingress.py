"""The HTTP front of the replicas: one OpenAI-compatible address for all of them.

It checks the API key and the body cap (the single server's `Guard`), hashes the prompt's full
blocks (`PromptHasher`, for the router), and forwards the request to the replica the router
picks; the replica's response (status, headers, body chunks) is relayed as it comes, with the
answering replica in `X-Kvcache-Replica`. A client may send that header to pin a replica. A
replica that dies before answering is replaced by another (the request is sent again); a stream
it cuts off ends with an error event. /metrics and /v1/cache/replicas gather every replica's figures.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import ray.exceptions
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from ray import serve

from kvcache.replicas import cluster_metrics
from kvcache.replicas.bridge import HTTPRequest, ResponseStart
from kvcache.replicas.prompt import PromptHasher
from kvcache.replicas.routing import replica_ids, replica_stats, routed_blocks
from kvcache.server.app import Guard
from kvcache.server.errors import APIError, error_body, install_error_handlers
from kvcache.server.metrics import ServerMetrics
from kvcache.server.state import ServerConfig

ENGINE = "engine"  # the replicas' deployment name
REPLICA_HEADER = "x-kvcache-replica"
_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
TRIES = 3  # sends of one request to replicas lost before they answered
_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


class Front:
    """The ingress's state: the replicas' handle, the server settings `Guard` reads, counters."""

    def __init__(self, engines, config: ServerConfig, routing: str):
        self.engines, self.config, self.routing = engines, config, routing
        self.metrics = ServerMetrics()
        self.routed: Counter[str] = Counter()
        self.retries = 0  # requests sent again after their replica died before answering
        self.cut_streams = 0  # streams a replica cut off (ended with an error event)
        self._hasher: PromptHasher | None = None
        self._hasher_lock = asyncio.Lock()

    async def hasher(self) -> PromptHasher:
        async with self._hasher_lock:
            if self._hasher is None:
                d = await self.engines.describe.remote()
                self._hasher = PromptHasher(d["tokenizer"], d["block_size"])
        return self._hasher

    async def replica_ids(self) -> list[str]:
        if not replica_ids(ENGINE):  # the router starts with the handle's first call
            await self.hasher()
        return replica_ids(ENGINE)

    async def open(self, req: HTTPRequest, hashes: list[int], pin: str | None):
        """(start, first body chunk or None, the rest) from the replica that answers. Nothing reaches
        the client before the first body chunk, so a replica lost until then is replaced: the
        request is sent again (at most `TRIES` times; a pinned request is not sent elsewhere)."""
        for _ in range(TRIES):
            chunks = self.engines.options(stream=True).forward.remote(req, hashes=hashes, pin=pin)
            try:
                start = await chunks.__anext__()
                first = await anext(chunks, None)
            except _LOST:
                self.retries += 1
                if pin is not None:
                    break
                continue
            self.routed[start.replica] += 1
            return start, first, chunks
        raise APIError(503, "No engine replica could answer the request; retry shortly.", code="replica_unavailable")

    async def relay(self, start: ResponseStart, first: bytes | None, chunks):
        """The body chunks; a replica lost mid-stream ends an event stream with an error event."""
        done = False
        try:
            if first is not None:
                yield first
                async for chunk in chunks:
                    yield chunk
            done = True
        except _LOST:
            self.cut_streams += 1
            if not _is_event_stream(start):
                raise
            body = error_body(503, "The engine replica answering this stream was lost; the reply is incomplete.",
                              code="replica_lost")
            yield f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()
            done = True
        finally:
            if not done:
                chunks.cancel()  # the client left: the replica's app sees a disconnect and aborts

    async def replica_stats(self) -> dict[str, dict]:
        """Each replica's latest figures (Serve's routing stats, a few seconds old at most)."""
        await self.replica_ids()
        return replica_stats(ENGINE)

    def counters(self) -> dict[str, tuple[str, str, int]]:
        return {"kvcache_request_retries_total": ("counter", "Requests sent again because their replica was lost "
                                                  "before answering.", self.retries),
                "kvcache_streams_cut_total": ("counter", "Streams ended with an error event because their replica "
                                              "was lost.", self.cut_streams)}


def _is_event_stream(start: ResponseStart) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in start.headers)


class Relayed(StreamingResponse):
    """A replica's response as it comes: its status and headers, plus which replica answered."""

    def __init__(self, start: ResponseStart, chunks):
        super().__init__(chunks, status_code=start.status)
        self.raw_headers = [(k, v) for k, v in start.headers if k.lower() != REPLICA_HEADER.encode()]
        self.raw_headers.append((REPLICA_HEADER.encode(), start.replica.encode()))


def build_app(front: Front) -> FastAPI:
    app = FastAPI(title="kvcache", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = cluster_metrics.prometheus(await front.replica_stats(), front.routed, front.metrics, front.counters())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/cache/replicas")
    async def replicas() -> dict:
        per = await front.replica_stats()
        held = routed_blocks(ENGINE)
        rows = [{**s, "routed": front.routed.get(r, 0), "routed_blocks": held.get(r, 0)} for r, s in sorted(per.items())]
        for row in rows:
            row.pop("kv_tier_errors_by_kind", None)
        return {"routing": front.routing, "replicas": rows, "cluster": cluster_metrics.cluster_stats(per)}

    @app.api_route("/{path:path}", methods=_METHODS, include_in_schema=False)
    async def forward(path: str, request: Request):
        body = await request.body()
        headers = [(k, v) for k, v in request.scope["headers"] if k.lower() not in (b"authorization", b"host")]
        req = HTTPRequest(request.method, request.url.path, request.scope.get("query_string", b""), headers, body)
        pin = request.headers.get(REPLICA_HEADER)
        if pin is not None and pin not in await front.replica_ids():
            raise APIError(400, f"No replica '{pin}'; the replicas are {', '.join(await front.replica_ids())}.",
                           REPLICA_HEADER)
        hashes = (await front.hasher()).hashes(req.path, body) if request.method == "POST" else []
        start, first, chunks = await front.open(req, hashes, pin)
        return Relayed(start, front.relay(start, first, chunks))

    app.add_middleware(Guard, state=front)
    return app


@serve.ingress()
class Ingress:
    """The Serve deployment of the front (one replica; its router picks the engine replicas)."""

    def __init__(self, engines, config: ServerConfig, routing: str):
        self.front = Front(engines, config, routing)

    def __serve_build_asgi_app__(self):
        return build_app(self.front)

