"""OpenAI-compatible endpoints: chat and text completions (streamed or not), models, health, metrics.

Every generation goes through the `AsyncEngine`, so concurrent requests share one
continuous batch and the prefix cache. A stream whose client goes away is closed, which
aborts its request and frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from kvcache.api.async_engine import StreamOutput
from kvcache.engine.length_rule import check_length
from kvcache.engine.sampling import SamplingParams
from kvcache.errors import KVCacheError, MaxTokensTooLargeError, PromptTooLongError
from kvcache.server.errors import APIError, error_body, log
from kvcache.server.schemas import (
    ChatChoice, ChatCompletion, ChatCompletionRequest, Completion, CompletionChoice, CompletionRequest, ErrorBody,
    ModelCard, ModelList, PromptTokensDetails, ResponseMessage, Usage,
)
from kvcache.server.state import ServerState

router = APIRouter()
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 429)}


def state_of(request: Request) -> ServerState:
    return request.app.state.server


# -- request -> (prompt ids, sampling params) ----------------------------------------------------
def chat_prompt_ids(llm, body: ChatCompletionRequest) -> list[int]:
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    try:
        return llm.chat_ids(messages)
    except KVCacheError:
        raise
    except Exception as exc:  # a template that refuses this conversation (e.g. role order)
        raise APIError(400, f"The chat template cannot render these messages: {exc}", "messages") from None


def completion_prompt_ids(llm, body: CompletionRequest) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, "Only one prompt per request is supported.", "prompt")
        prompt = prompt[0]
    try:
        return llm.encode(prompt)
    except KVCacheError as exc:
        raise APIError.from_user_error(exc, "prompt") from None


def sampling_params(llm, body, prompt_len: int, max_tokens: int | None) -> SamplingParams:
    """SamplingParams for a request, with OpenAI's length rules checked against the context."""
    if bad := body.unsupported():
        raise APIError(400, bad[1], bad[0], "unsupported_parameter")
    limit = llm.max_model_len
    room = limit - prompt_len
    try:
        check_length(1 if max_tokens is None else max_tokens, limit, prompt_len, llm.truncation)
    except MaxTokensTooLargeError as exc:
        raise APIError.from_user_error(exc, "max_tokens") from None
    except PromptTooLongError as exc:
        raise APIError.from_user_error(exc, "messages" if isinstance(body, ChatCompletionRequest) else "prompt") \
            from None
    top_k = body.top_k if body.top_k and body.top_k > 0 else 0
    try:
        return SamplingParams(
            max_tokens=max_tokens or max(1, min(room, limit - 1)),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=top_k,
            repetition_penalty=body.repetition_penalty or 1.0, stop=body.stop, seed=body.seed,
            ignore_eos=bool(body.ignore_eos),
        )
    except KVCacheError as exc:
        raise APIError.from_user_error(exc) from None


# -- responses -----------------------------------------------------------------------------------
def usage_of(update: StreamOutput) -> Usage:
    m = update.output.metrics
    n_out = len(update.output.token_ids)
    return Usage(prompt_tokens=m.prompt_tokens, completion_tokens=n_out, total_tokens=m.prompt_tokens + n_out,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=m.cached_prompt_tokens))


@dataclass
class _Job:
    """One generation: what the route prepared and how to shape its chunks."""

    state: ServerState
    request_id: str
    chat: bool
    include_usage: bool
    model: str
    created: int
    finished: bool = False  # the engine finished (or failed) the request
    closed: bool = False

    async def close(self) -> None:
        """Once: abort the request unless it finished (frees its blocks), and leave the in-flight count."""
        if self.closed:
            return
        self.closed = True
        try:
            if not self.finished:
                self.state.metrics.disconnects += 1
                await self.state.engine.abort(self.request_id)
        finally:
            self.state.release()

    def chunk(self, delta: str | None, finish: str | None = None, usage: Usage | None = None,
              role: bool = False) -> str:
        if self.chat:
            obj, choice = "chat.completion.chunk", {"index": 0, "finish_reason": finish, "logprobs": None,
                                                   "delta": {}}
            if role:
                choice["delta"]["role"] = "assistant"
            if delta is not None:
                choice["delta"]["content"] = delta
        else:
            obj, choice = "text_completion", {"index": 0, "text": delta or "", "finish_reason": finish,
                                              "logprobs": None}
        body = {"id": self.request_id, "object": obj, "created": self.created, "model": self.model,
                "choices": [] if usage is not None else [choice]}
        if self.include_usage:
            body["usage"] = usage.model_dump() if usage is not None else None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def final(self, last: StreamOutput) -> JSONResponse:
        out, usage = last.output, usage_of(last)
        if self.chat:
            body = ChatCompletion(id=self.request_id, created=self.created, model=self.model, usage=usage, choices=[
                ChatChoice(message=ResponseMessage(content=out.text), finish_reason=out.finish_reason)])
        else:
            body = Completion(id=self.request_id, created=self.created, model=self.model, usage=usage,
                              choices=[CompletionChoice(text=out.text, finish_reason=out.finish_reason)])
        return JSONResponse(body.model_dump())


def _failure(update: StreamOutput) -> APIError | None:
    if update.output.error:
        return APIError(400, update.output.error, code="kv_cache_exhausted")
    return None


async def _events(job: _Job, stream: AsyncIterator[StreamOutput]) -> AsyncIterator[str]:
    """SSE chunks in OpenAI's format, ending with `data: [DONE]`; errors become an error event."""
    try:
        if job.chat:
            yield job.chunk("", role=True)
        async for update in stream:
            finished = job.finished = update.finished
            if finished and (err := _failure(update)):
                yield f"data: {json.dumps(err.body())}\n\n"
                break
            if update.delta:
                yield job.chunk(update.delta)
            if finished:
                yield job.chunk(None if job.chat else "", finish=update.output.finish_reason)
                if job.include_usage:
                    yield job.chunk(None, usage=usage_of(update))
        yield "data: [DONE]\n\n"
    except Exception as exc:  # the engine failed this request: say so in the stream, keep serving
        job.finished = True
        log.exception("stream %s failed", job.request_id)
        yield f"data: {json.dumps(error_body(500, f'Generation failed ({type(exc).__name__}).'))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await stream.aclose()
        await job.close()


class EngineStream(StreamingResponse):
    """A StreamingResponse that always ends its job: a client that disconnects (even before the
    first byte) gets its request aborted and its KV blocks freed at once."""

    def __init__(self, job: _Job, stream: AsyncIterator[StreamOutput]):
        super().__init__(_events(job, stream), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Request-Id": job.request_id})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self.job.close()


async def _collect(request: Request, stream: AsyncIterator[StreamOutput]) -> StreamOutput | None:
    """The last update of a non-streamed request; None if the client went away first (then aborted)."""

    async def drain():
        last = None
        async for update in stream:
            last = update
        return last

    task = asyncio.ensure_future(drain())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await stream.aclose()


async def _generate(request: Request, job: _Job, ids: list[int], params: SamplingParams, stream: bool):
    state = job.state
    state.admit()
    try:
        updates = state.engine.add_request(ids, params, request_id=job.request_id)
    except KVCacheError as exc:
        state.release()
        raise APIError.from_user_error(exc) from None
    if stream:
        return EngineStream(job, updates)
    try:
        last = await _collect(request, updates)
        job.finished = last is not None
    finally:
        await job.close()
    if last is None:
        return JSONResponse(error_body(499, "The client closed the request."), status_code=499)
    if err := _failure(last):
        raise err
    return job.final(last)


def _job(state: ServerState, body, chat: bool) -> _Job:
    state.check_model(body.model)
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    prefix = "chatcmpl" if chat else "cmpl"
    return _Job(state, f"{prefix}-{uuid.uuid4().hex}", chat, include_usage, state.model_name, int(time.time()))


# -- endpoints -----------------------------------------------------------------------------------
@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS, tags=["openai"])
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """Chat completion (OpenAI format). With `stream: true`, server-sent events ending with [DONE]."""
    state = state_of(request)
    job = _job(state, body, chat=True)
    ids = chat_prompt_ids(state.llm, body)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = sampling_params(state.llm, body, len(ids), max_tokens)
    return await _generate(request, job, ids, params, bool(body.stream))


@router.post("/v1/completions", response_model=Completion, responses=ERRORS, tags=["openai"])
async def completions(body: CompletionRequest, request: Request):
    """Text completion of one prompt (a string or token ids), streamed or not."""
    state = state_of(request)
    job = _job(state, body, chat=False)
    ids = completion_prompt_ids(state.llm, body)
    params = sampling_params(state.llm, body, len(ids), body.max_tokens)
    return await _generate(request, job, ids, params, bool(body.stream))


@router.get("/v1/models", response_model=ModelList, responses=ERRORS, tags=["openai"])
async def models(request: Request):
    """The one model this server serves."""
    state = state_of(request)
    card = ModelCard(id=state.model_name, created=int(state.metrics.started), max_model_len=state.llm.max_model_len)
    return ModelList(data=[card])


@router.get("/health", tags=["ops"])
async def health(request: Request) -> dict:
    """Liveness: 200 with the engine's queue lengths while the engine thread is alive."""
    state = state_of(request)
    s = state.stats()
    return {"status": "ok", "model": state.model_name, "running": s["running"], "waiting": s["waiting"]}


@router.get("/metrics", response_class=PlainTextResponse, tags=["ops"])
async def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text format: KV blocks, prefix hit rate, queue, tokens/s, preemptions, requests."""
    state = state_of(request)
    return PlainTextResponse(state.metrics.prometheus(state.stats()), media_type="text/plain; version=0.0.4")
