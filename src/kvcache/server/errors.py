"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}`, never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvcache.errors import KVCacheError, PromptTooLongError

log = logging.getLogger("kvcache.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}


class APIError(Exception):
    """An error answered to the client with `status` and one sentence."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    @classmethod
    def from_user_error(cls, exc: KVCacheError, param: str | None = None) -> "APIError":
        """A 400 for bad input the engine refused."""
        code = "context_length_exceeded" if isinstance(exc, PromptTooLongError) else None
        return cls(400, str(exc), param, code)

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "The request body is invalid.", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    if param is None and first.get("type") == "missing":
        return "The request needs a JSON body.", None
    if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
        return "The request body must be a JSON object.", None
    msg = str(first.get("msg", "is invalid")).rstrip(".")
    if first.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}.", param
    return (f"Invalid value for '{param}': {msg}." if param else f"Invalid request: {msg}."), param


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can meet becomes an OpenAI-style body; unexpected ones are logged, not shown."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(KVCacheError)
    async def _user_error(request: Request, exc: KVCacheError):
        return JSONResponse(APIError.from_user_error(exc).body(), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        if exc.status_code == 404 and message == "Not Found":
            message = f"No such endpoint: {request.method} {request.url.path}."
        if exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, f"Internal server error ({type(exc).__name__}); the server keeps running.")
