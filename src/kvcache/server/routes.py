"""OpenAI-compatible endpoints: chat and text completions (streamed or not), models, health, metrics.

Every generation goes through the `AsyncEngine`, so concurrent requests share one
continuous batch and the prefix cache. A prompt asked for n samples (or best_of) is one engine
request whose samples share its prompt's blocks; choice `prompt_index * n + sample` is each. A stream whose client goes away is closed, which
aborts its request and frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from kvcache.api.async_engine import StreamOutput
from kvcache.engine.length_rule import check_length
from kvcache.engine.logprobs import prompt_logprobs
from kvcache.engine.outputs import RequestMetrics, RequestOutput
from kvcache.engine.sampling import SamplingParams
from kvcache.errors import KVCacheError, MaxTokensTooLargeError, PromptTooLongError
from kvcache.server.errors import APIError, error_body, log
from kvcache.server.logprobs import chat_logprobs, completion_logprobs
from kvcache.server.schemas import (
    ChatChoice, ChatCompletion, ChatCompletionRequest, Completion, CompletionChoice, CompletionRequest, ErrorBody,
    ModelCard, ModelList, PromptTokensDetails, ResponseMessage, Usage, template_messages,
)
from kvcache.server.state import ServerState
from kvcache.server.structured import (
    TOOL_CALL_BLOCK, ToolPlan, response_format_grammar, template_renders_tools, tool_calls, tool_plan,
    with_tools_prompt,
)

router = APIRouter()
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 429)}


def state_of(request: Request) -> ServerState:
    return request.app.state.server


# -- request -> (prompt ids, sampling params) ----------------------------------------------------
def chat_prompt_ids(llm, body: ChatCompletionRequest, plan: ToolPlan | None = None) -> list[int]:
    """The conversation rendered for the reply; a request that calls tools shows them to the
    model (through the template when it renders tools, else in the system message)."""
    messages = template_messages(body.messages)
    tools = None
    if plan is not None:
        tools = plan.template_tools or None
        if tools is None:
            messages = with_tools_prompt(messages, plan)
    try:
        return llm.chat_ids(messages, tools=tools)
    except KVCacheError:
        raise
    except Exception as exc:  # a template that refuses this conversation (e.g. role order)
        raise APIError(400, f"The chat template cannot render these messages: {exc}", "messages") from None


def completion_prompts(llm, body: CompletionRequest, samples: int) -> list[tuple[list[int], str]]:
    """(token ids, text to echo) of each prompt of a completions request (`samples` sequences each)."""
    prompt = body.prompt
    prompts = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]
    limit = llm.engine.config.max_num_seqs
    if len(prompts) > limit:
        raise APIError(400, f"At most {limit} prompts per request are supported, got {len(prompts)}.", "prompt")
    if len(prompts) * samples > limit:
        raise APIError(400, f"At most {limit} sequences (prompts x samples) per request are supported, "
                            f"got {len(prompts) * samples}.", "prompt")
    out = []
    for p in prompts:
        try:
            ids = llm.encode(p)
        except KVCacheError as exc:
            raise APIError.from_user_error(exc, "prompt") from None
        out.append((ids, p if isinstance(p, str) else llm.tokenizer.decode(ids)))
    return out


def sampling_params(llm, body, prompt_len: int, max_tokens: int | None, logprobs: int | None = None,
                    prompt_logprobs: int | None = None, n: int = 1, grammar: tuple[dict | None, bool] = (None, False),
                    grammar_param: str = "response_format") -> SamplingParams:
    """SamplingParams for a request, with OpenAI's length rules checked against the context;
    `grammar` (json_schema, json_object) is compiled here, so a bad schema is a 400 naming
    `grammar_param`."""
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
        params = SamplingParams(
            max_tokens=max_tokens or max(1, min(room, limit - 1)),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=top_k,
            repetition_penalty=body.repetition_penalty or 1.0, stop=body.stop, seed=body.seed,
            ignore_eos=bool(body.ignore_eos), logprobs=logprobs, prompt_logprobs=prompt_logprobs, n=n,
            json_schema=grammar[0], json_object=grammar[1],
        )
    except KVCacheError as exc:
        raise APIError.from_user_error(exc) from None
    if params.structured:
        try:
            llm.engine.grammars.compile(params)
        except KVCacheError as exc:
            raise APIError.from_user_error(exc, grammar_param) from None
    return params


# -- responses -----------------------------------------------------------------------------------
@dataclass
class _Choice:
    """One sample of one prompt of a request: its engine request and what its stream has sent so far."""

    index: int
    request_id: str  # the engine's id (shared by the samples of one prompt)
    prompt_ids: list[int]
    echo_text: str = ""  # the prompt's text, shown before the completion when echo is on
    sample: int = 0  # which of its prompt's samples
    last: StreamOutput | None = None
    finished: bool = False
    sent_logprobs: int = 0
    sent_chars: int = 0


@dataclass
class _Job:
    """One HTTP generation: what the route prepared and how to shape its chunks."""

    state: ServerState
    request_id: str
    chat: bool
    include_usage: bool
    model: str
    created: int
    continuous_usage: bool = False  # usage so far on every chunk
    logprobs: int | None = None  # top alternatives per token, when logprobs were asked for
    echo: bool = False
    n: int = 1  # choices answered per prompt
    samples: int = 1  # sequences generated per prompt (best_of; n unless best_of is larger)
    choices: list[_Choice] = field(default_factory=list)  # prompt-major: prompt i's sample j at i * samples + j
    tools: ToolPlan | None = None  # the reply may be a tool call (chat)
    closed: bool = False

    def choice(self, prompt: int, update: StreamOutput) -> _Choice:
        """The choice an engine update of prompt number `prompt` belongs to."""
        return self.choices[prompt * self.samples + update.index]

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.choices)

    async def close(self) -> None:
        """Once: abort the requests that did not finish (frees their blocks), and leave the in-flight count."""
        if self.closed:
            return
        self.closed = True
        try:
            if not self.finished:
                self.state.metrics.disconnects += 1
            for rid in dict.fromkeys(c.request_id for c in self.choices if not c.finished):
                await self.state.engine.abort(rid)
        finally:
            self.state.release()

    def usage(self) -> Usage:
        """Usage so far: each prompt once (a prompt with no update yet counts its ids), every
        sample's tokens (best_of's unreturned ones too)."""
        prompt = cached = completion = 0
        for c in self.choices:
            out = c.last.output if c.last is not None else None
            if c.sample == 0:
                prompt += out.metrics.prompt_tokens if out else len(c.prompt_ids)
                cached += out.metrics.cached_prompt_tokens if out else 0
            completion += len(out.token_ids) if out else 0
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    def answered(self) -> list[_Choice]:
        """The choices of the reply: all of them, or under best_of each prompt's n samples with
        the highest total logprob (best first), numbered again."""
        if self.samples == self.n:
            return self.choices
        out = []
        for p in range(len(self.choices) // self.samples):
            group = self.choices[p * self.samples : (p + 1) * self.samples]
            best = sorted(group, key=lambda c: -sum(e.logprob for e in c.last.output.logprobs or []))[: self.n]
            out += [replace(c, index=p * self.n + k) for k, c in enumerate(best)]
        return out

    def new_logprobs(self, c: _Choice, update: StreamOutput, echo: bool = False) -> dict | None:
        """The logprobs of the tokens `c` has not sent yet (the prompt's when `echo`)."""
        if self.logprobs is None:
            return None
        tok = self.state.llm.tokenizer
        out = update.output
        if echo:
            ids = out.prompt_token_ids
            return completion_logprobs(tok, ids, out.prompt_logprobs or [None] * len(ids))
        entries = (out.logprobs or [])[c.sent_logprobs:]
        c.sent_logprobs += len(entries)
        if self.chat:
            return chat_logprobs(tok, entries)
        return completion_logprobs(tok, [e.token_id for e in entries], entries, c.sent_chars)

    def chunk(self, index: int, delta: str | None, finish: str | None = None, usage: Usage | None = None,
              role: bool = False, logprobs: dict | None = None, final_usage: bool = False,
              tool_calls: list[dict] | None = None) -> str:
        if self.chat:
            obj, choice = "chat.completion.chunk", {"index": index, "finish_reason": finish, "logprobs": logprobs,
                                                   "delta": {}}
            if role:
                choice["delta"]["role"] = "assistant"
            if delta is not None:
                choice["delta"]["content"] = delta
            if tool_calls is not None:
                choice["delta"]["tool_calls"] = [{"index": j, **call} for j, call in enumerate(tool_calls)]
        else:
            obj, choice = "text_completion", {"index": index, "text": delta or "", "finish_reason": finish,
                                              "logprobs": logprobs}
        body = {"id": self.request_id, "object": obj, "created": self.created, "model": self.model,
                "choices": [] if final_usage else [choice]}
        if self.continuous_usage and usage is None:
            usage = self.usage()
        if self.include_usage or self.continuous_usage:
            body["usage"] = usage.model_dump() if usage is not None else None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def reply(self, out: RequestOutput) -> tuple[str | None, list[dict] | None, str]:
        """(content, tool_calls, finish_reason) of a finished chat choice: a complete tool call
        becomes `tool_calls` with finish_reason 'tool_calls'; anything else stays text."""
        calls = tool_calls(out.text, self.tools) if self.tools is not None and out.finish_reason == "stop" else None
        if calls is None:
            return out.text, None, out.finish_reason
        rest = "" if self.tools.schema is not None else TOOL_CALL_BLOCK.sub("", out.text).strip()
        return rest or None, calls, "tool_calls"

    def final(self) -> JSONResponse:
        usage, tok = self.usage(), self.state.llm.tokenizer
        choices = []
        for c in self.answered():
            out = c.last.output
            if self.chat:
                lp = None if self.logprobs is None else chat_logprobs(tok, out.logprobs or [])
                content, calls, finish = self.reply(out)
                choices.append(ChatChoice(index=c.index, message=ResponseMessage(content=content, tool_calls=calls),
                                          finish_reason=finish, logprobs=lp))
                continue
            lp = None
            if self.logprobs is not None:
                ids, entries = list(out.token_ids), list(out.logprobs or [])
                if self.echo:
                    prompt = out.prompt_token_ids
                    ids, entries = prompt + ids, list(out.prompt_logprobs or [None] * len(prompt)) + entries
                lp = completion_logprobs(tok, ids, entries)
            choices.append(CompletionChoice(index=c.index, text=c.echo_text + out.text,
                                            finish_reason=out.finish_reason, logprobs=lp))
        reply = ChatCompletion if self.chat else Completion
        body = reply(id=self.request_id, created=self.created, model=self.model, usage=usage, choices=choices)
        return JSONResponse(body.model_dump())


def _failure(update: StreamOutput) -> APIError | None:
    if update.output.error:
        return APIError(400, update.output.error, code="kv_cache_exhausted")
    return None


async def _events(job: _Job, updates: AsyncIterator[tuple[int, StreamOutput]]) -> AsyncIterator[str]:
    """SSE chunks in OpenAI's format, ending with `data: [DONE]`; errors become an error event."""
    try:
        if job.chat:
            for c in job.choices:
                yield job.chunk(c.index, "", role=True)
        failed = False
        async for i, update in updates:
            c = job.choice(i, update)
            if c.last is None and job.echo:  # the prompt first, with its own logprobs
                c.sent_chars = len(c.echo_text)
                yield job.chunk(c.index, c.echo_text, logprobs=job.new_logprobs(c, update, echo=True))
            c.last, c.finished = update, update.finished
            if update.finished and (err := _failure(update)):
                yield f"data: {json.dumps(err.body())}\n\n"
                failed = True
                break
            if job.tools is not None:  # a reply that may be a tool call is sent whole, once finished
                if update.finished:
                    content, calls, finish = job.reply(update.output)
                    yield job.chunk(c.index, content, logprobs=job.new_logprobs(c, update), tool_calls=calls)
                    yield job.chunk(c.index, None, finish=finish)
                continue
            lp = job.new_logprobs(c, update) if update.delta or update.finished else None
            has_lp = lp is not None and (lp.get("content") or lp.get("tokens"))
            if update.delta or has_lp:
                yield job.chunk(c.index, update.delta, logprobs=lp)
                c.sent_chars += len(update.delta)
            if update.finished:
                yield job.chunk(c.index, None if job.chat else "", finish=update.output.finish_reason)
        if job.include_usage and not failed:
            yield job.chunk(0, None, usage=job.usage(), final_usage=True)
        yield "data: [DONE]\n\n"
    except Exception as exc:  # the engine failed this request: say so in the stream, keep serving
        for c in job.choices:
            c.finished = True
        log.exception("stream %s failed", job.request_id)
        yield f"data: {json.dumps(error_body(500, f'Generation failed ({type(exc).__name__}).'))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await updates.aclose()
        await job.close()


class EngineStream(StreamingResponse):
    """A StreamingResponse that always ends its job: a client that disconnects (even before the
    first byte) gets its requests aborted and their KV blocks freed at once."""

    def __init__(self, job: _Job, updates: AsyncIterator[tuple[int, StreamOutput]]):
        super().__init__(_events(job, updates), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Request-Id": job.request_id})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self.job.close()


async def _merged(streams: list[AsyncIterator[StreamOutput]]) -> AsyncIterator[tuple[int, StreamOutput]]:
    """(choice index, update) from several engine streams as they come; closing it closes them all
    (each aborts its request unless finished)."""
    if len(streams) == 1:
        try:
            async for update in streams[0]:
                yield 0, update
        finally:
            await streams[0].aclose()
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[StreamOutput]) -> None:
        try:
            async for update in stream:
                await q.put((i, update))
            await q.put((i, None))
        except Exception as exc:  # hand the failure to the reader
            await q.put((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()


async def _collect(request: Request, job: _Job, updates: AsyncIterator[tuple[int, StreamOutput]]) -> bool:
    """Drain a non-streamed request into its choices; False if the client went away first (then aborted)."""

    async def drain():
        async for i, update in updates:
            c = job.choice(i, update)
            c.last, c.finished = update, update.finished

    task = asyncio.ensure_future(drain())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                task.result()
                return True
            if await request.is_disconnected():
                return False
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await updates.aclose()


async def _prompt_only(state: ServerState, ids: list[int], k: int | None, n: int) -> AsyncIterator[StreamOutput]:
    """The update of each of n samples of an echo with max_tokens 0: no generation, the prompt's
    logprobs when asked (computed once, on the engine thread between steps)."""
    lps = None if k is None else await state.engine.call(lambda e: prompt_logprobs(e.model, ids, k))
    out = RequestOutput(ids, [], "", "length", RequestMetrics(prompt_tokens=len(ids)), logprobs=[],
                        prompt_logprobs=lps)
    for j in range(n):
        yield StreamOutput("", "", True, out, j)


async def _generate(request: Request, job: _Job, prompts: list[tuple[list[int], SamplingParams | None]],
                    stream: bool):
    """Run each (ids, params) as its own engine request in the one batch (params None: echo the
    prompt alone), then answer them as one streamed or whole reply."""
    state = job.state
    state.admit()
    streams = []
    try:
        for i, (ids, params) in enumerate(prompts):
            rid = job.request_id if len(prompts) == 1 else f"{job.request_id}-{i}"
            for c in job.choices[i * job.samples : (i + 1) * job.samples]:
                c.request_id = rid
            if params is None:
                streams.append(_prompt_only(state, ids, job.logprobs, job.samples))
            else:
                streams.append(state.engine.add_request(ids, params, request_id=rid))
    except KVCacheError as exc:
        for s in streams:
            await s.aclose()
        state.release()
        raise APIError.from_user_error(exc) from None
    updates = _merged(streams)
    if stream:
        return EngineStream(job, updates)
    try:
        ok = await _collect(request, job, updates)
    finally:
        await job.close()
    if not ok:
        return JSONResponse(error_body(499, "The client closed the request."), status_code=499)
    for c in job.choices:
        if err := _failure(c.last):
            raise err
    return job.final()


def _job(state: ServerState, body, chat: bool) -> _Job:
    state.check_model(body.model)
    options = body.stream_options if body.stream else None
    include_usage = bool(options and options.include_usage)
    prefix = "chatcmpl" if chat else "cmpl"
    return _Job(state, f"{prefix}-{uuid.uuid4().hex}", chat, include_usage, state.model_name, int(time.time()),
                continuous_usage=bool(options and options.continuous_usage_stats))


# -- endpoints -----------------------------------------------------------------------------------
@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS, tags=["openai"])
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """Chat completion (OpenAI format). With `stream: true`, server-sent events ending with [DONE]."""
    state = state_of(request)
    job = _job(state, body, chat=True)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true.", "top_logprobs")
    job.logprobs = (body.top_logprobs or 0) if body.logprobs else None
    renders_tools = bool(body.tools) and template_renders_tools(state.llm.tokenizer)
    job.tools = tool_plan(body.tools, body.tool_choice, renders_tools)
    grammar, grammar_param = response_format_grammar(body.response_format), "response_format"
    if job.tools is not None and job.tools.schema is not None:
        if grammar != (None, False):
            raise APIError(400, "response_format cannot be combined with a tool_choice that forces a call.",
                           "response_format")
        grammar, grammar_param = (job.tools.schema, False), "tools"
    ids = chat_prompt_ids(state.llm, body, job.tools)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    job.n = job.samples = body.n or 1
    params = sampling_params(state.llm, body, len(ids), max_tokens, logprobs=job.logprobs, n=job.n, grammar=grammar,
                             grammar_param=grammar_param)
    job.choices = [_Choice(j, job.request_id, ids, sample=j) for j in range(job.n)]
    return await _generate(request, job, [(ids, params)], bool(body.stream))


@router.post("/v1/completions", response_model=Completion, responses=ERRORS, tags=["openai"])
async def completions(body: CompletionRequest, request: Request):
    """Text completion of one prompt or several (strings or token-id lists; n choices each, run in
    the same batch), streamed or not."""
    state = state_of(request)
    job = _job(state, body, chat=False)
    job.logprobs, job.echo = body.logprobs, bool(body.echo)
    if body.max_tokens == 0 and not job.echo:
        raise APIError(400, "max_tokens must be at least 1 unless echo is true.", "max_tokens")
    job.n = body.n or 1
    job.samples = body.best_of or job.n
    if job.samples < job.n:
        raise APIError(400, f"best_of must be at least n ({job.n}), got {job.samples}.", "best_of")
    if job.samples > job.n and body.stream:
        raise APIError(400, "best_of greater than n cannot be streamed.", "best_of")
    prompt_k = body.logprobs if job.echo else None  # the prompt's own logprobs: one extra forward each
    engine_k = job.logprobs if job.logprobs is not None or job.samples == job.n else 0  # best_of ranks by them
    grammar = response_format_grammar(body.response_format)
    prompts = []
    for i, (ids, text) in enumerate(completion_prompts(state.llm, body, job.samples)):
        params = sampling_params(state.llm, body, len(ids), body.max_tokens, engine_k, prompt_k, job.samples,
                                 grammar)
        prompts.append((ids, None if body.max_tokens == 0 else params))  # 0: the prompt alone, scored
        job.choices += [_Choice(i * job.samples + j, job.request_id, ids, text if job.echo else "", j)
                        for j in range(job.samples)]
    return await _generate(request, job, prompts, bool(body.stream))


@router.get("/v1/models", response_model=ModelList, responses=ERRORS, tags=["openai"])
async def models(request: Request):
    """The one model this server serves."""
    return ModelList(data=[_card(state_of(request))])


def _card(state: ServerState) -> ModelCard:
    return ModelCard(id=state.model_name, created=int(state.metrics.started), max_model_len=state.llm.max_model_len)


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS, tags=["openai"])
async def model(model_id: str, request: Request):
    """The model's card; 404 (OpenAI's error body) for any other id."""
    state = state_of(request)
    state.check_model(model_id)
    return _card(state)


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
