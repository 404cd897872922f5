"""OpenAI-compatible request and response bodies (pydantic).

Requests accept OpenAI's parameter names. Parameters we do not implement are still
declared, so a client that sends their neutral value works and one that asks for the
feature gets a 400 naming it (`unsupported()`); unknown names are refused like OpenAI does.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvcache.engine.persist import SessionInfo
from kvcache.server.errors import APIError

MAX_SAMPLES = 16  # the most n (and best_of) per prompt
NonNegInt = Annotated[int, Field(ge=0)]
TokenId = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    """A content part of another type (image_url, input_audio, ...): accepted by the schema so that
    the route can refuse it with one sentence naming its type."""

    model_config = ConfigDict(extra="allow")
    type: str

    @field_validator("type")
    @classmethod
    def _not_text(cls, value: str) -> str:
        if value == "text":
            raise ValueError("a text part needs 'text'")
        return value


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | OtherPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls, sent back
    tool_call_id: str | None = None  # a tool message: the call it answers

    def other_part(self) -> tuple[int, str] | None:
        """(index, type) of the first content part that is not text."""
        if isinstance(self.content, list):
            return next(((j, p.type) for j, p in enumerate(self.content) if isinstance(p, OtherPart)), None)
        return None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        if self.content is None and self.tool_calls:  # earlier calls, as the model wrote them
            return "\n".join(json.dumps(_call_json(c), ensure_ascii=False) for c in self.tool_calls)
        return self.content or ""


def _call_json(call: dict) -> dict:
    """{"name", "arguments"} of an OpenAI tool call (arguments parsed when they are JSON text)."""
    fn = call.get("function") if isinstance(call.get("function"), dict) else {}
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    return {"name": fn.get("name"), "arguments": args}


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """{role, content} dicts for the chat template; a part that is not text is a 400 naming it."""
    for i, m in enumerate(messages):
        if (other := m.other_part()) is not None:
            j, kind = other
            what = "Image inputs are" if kind == "image_url" else f"Content parts of type '{kind}' are"
            raise APIError(400, f"{what} not supported by this text model (messages.{i}.content.{j}).",
                           f"messages.{i}.content.{j}.type")
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


class StreamOptions(BaseModel):
    """Unknown fields here are ignored (clients send options of other servers)."""

    include_usage: bool = False
    continuous_usage_stats: bool = False  # usage (so far) on every chunk


class _SamplingRequest(_Strict):
    """Parameters shared by chat and text completions."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, description="extra: 0 or -1 = off")
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_SAMPLES, description="samples per prompt (the prompt's KV is shared)")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, description="only 0 is supported")
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, description="only 0 is supported")
    repetition_penalty: float | None = Field(default=None, gt=0, le=10, description="extra")
    ignore_eos: bool | None = Field(default=None, description="extra")
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None  # text | json_object | json_schema
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(param, sentence) for the first parameter asking for something we do not do."""
        checks = [
            ("presence_penalty", self.presence_penalty not in (None, 0), "presence_penalty is not supported; use 0 (or repetition_penalty)."),
            ("frequency_penalty", self.frequency_penalty not in (None, 0), "frequency_penalty is not supported; use 0 (or repetition_penalty)."),
            ("logit_bias", bool(self.logit_bias), "logit_bias is not supported."),
            *self._unsupported_extra(),
        ]
        return next(((p, msg) for p, bad, msg in checks if bad), None)

    def _unsupported_extra(self) -> list[tuple[str, bool, str]]:
        return []


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = Field(default=None, description="accepted; a reply makes at most one call")


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="a string, a token-id list, or a list of either (one choice each)")
    max_tokens: int | None = Field(default=None, ge=0, description="0 only with echo: score the prompt")
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=MAX_SAMPLES,
                                description="samples per prompt, of which the n with the highest total logprob are returned")

    def _unsupported_extra(self):
        return [("suffix", bool(self.suffix), "suffix is not supported.")]


class SessionRequest(_Strict):
    """A conversation to save: chat messages (rendered with the chat template) or token ids."""

    model: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    token_ids: list[TokenId] | None = Field(default=None, min_length=1)


# -- responses -------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str
    logprobs: dict[str, Any] | None = None  # {"content": [{token, logprob, bytes, top_logprobs}]}


class _Reply(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage


class ChatCompletion(_Reply):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str
    logprobs: dict[str, Any] | None = None  # {tokens, token_logprobs, top_logprobs, text_offset}


class Completion(_Reply):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvcache"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class TokenizerInfo(BaseModel):
    """vLLM's /tokenizer_info: what a client needs to use the server's tokenizer remotely."""

    tokenizer_class: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    unk_token: str | None
    model_max_length: int
    chat_template: str | None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class SessionSaved(BaseModel):
    name: str
    num_tokens: int
    bytes: int


class SessionLoaded(BaseModel):
    name: str
    num_tokens: int
    blocks_restored: int
    blocks_already_cached: int


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionInfo]
