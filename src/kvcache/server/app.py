"""The app factory (`create_app`), the request guard (API key, body size, counts) and `serve`."""

from __future__ import annotations

import hmac
import json
import logging

from fastapi import FastAPI
from starlette.exceptions import HTTPException

from kvcache.server.errors import error_body, install_error_handlers
from kvcache.server.state import ServerConfig, ServerState

OPEN_PATHS = ("/health", "/dashboard", "/docs", "/openapi.json", "/redoc")  # no API key needed
COUNTED_PATHS = ("/health", "/metrics", "/dashboard", "/tokenize", "/detokenize", "/tokenizer_info")


def _endpoint_label(path: str) -> str:
    """A bounded label for request counters (session names are not labels)."""
    for prefix in ("/v1/sessions", "/v1/cache", "/v1/models", "/v1/chat/completions", "/v1/completions"):
        if path.startswith(prefix):
            return prefix
    return path if path in COUNTED_PATHS else "other"


class Guard:
    """ASGI middleware: API key on /v1/* and /metrics, a cap on body size, request counts."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state
        key = state.config.api_key
        self.key = f"Bearer {key}".encode() if key else None

    async def _reply(self, send, status: int, message: str, code: str | None = None) -> None:
        body = json.dumps(error_body(status, message, code=code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        label = _endpoint_label(path)
        status_seen = [0]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status_seen[0] = message["status"]
            await send(message)

        try:
            if self.key is not None and not path.startswith(OPEN_PATHS):
                given = dict(scope.get("headers", [])).get(b"authorization", b"")
                if not hmac.compare_digest(given, self.key):
                    return await self._reply(counting_send, 401, "Missing or wrong API key: send "
                                             "'Authorization: Bearer <key>'.", "invalid_api_key")
            limit = self.state.config.max_body_bytes
            length = dict(scope.get("headers", [])).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                return await self._reply(counting_send, 413, f"The request body is larger than {limit} bytes.")
            await self.app(scope, self._capped(receive, limit), counting_send)
        except _BodyTooLarge:
            if not status_seen[0]:
                await self._reply(counting_send, 413, f"The request body is larger than {limit} bytes.")
        finally:
            self.state.metrics.count(label, status_seen[0] or 499)

    @staticmethod
    def _capped(receive, limit: int):
        seen = [0]

        async def wrapped():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    raise _BodyTooLarge(413, f"The request body is larger than {limit} bytes.")
            return message

        return wrapped


class _BodyTooLarge(HTTPException):
    """Raised while reading a body past the cap; FastAPI re-raises HTTP exceptions, the handlers answer 413."""


def create_app(llm, config: ServerConfig | None = None) -> FastAPI:
    """The OpenAI-compatible app serving `llm` (an `LLM`); `app.state.server.close()` stops its engine."""
    from kvcache.server.dashboard import router as dashboard_router
    from kvcache.server.routes import router as openai_router
    from kvcache.server.sessions import router as sessions_router
    from kvcache.server.tokens import router as tokens_router

    state = ServerState(llm, config or ServerConfig())
    app = FastAPI(title="kvcache", version="0.1.0",
                  description="OpenAI-compatible API over the kvcache engine (paged KV cache, prefix caching).")
    app.state.server = state
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(sessions_router)
    app.include_router(tokens_router)
    app.include_router(dashboard_router)
    app.add_middleware(Guard, state=state)
    return app


def serve(llm, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the server until interrupted. The KV pool is committed up front so memory stays steady."""
    import uvicorn

    engine = llm.engine
    engine.storage.zero_blocks(range(engine.config.num_blocks))
    app = create_app(llm, config)
    logging.getLogger("kvcache.server").setLevel(log_level.upper())
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        app.state.server.close()
