"""vLLM's token endpoints: `POST /tokenize` (a prompt, or chat messages through the chat
template), `POST /detokenize` (token ids back to text) and `GET /tokenizer_info` (special
tokens, context length, chat template), which lm-evaluation-harness looks for before it uses
the server's tokenizer instead of downloading one."""

from __future__ import annotations

from fastapi import APIRouter, Request

from kvcache.server.errors import APIError
from kvcache.server.routes import ERRORS, state_of
from kvcache.server.schemas import (
    DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse, TokenizerInfo, template_messages,
)

router = APIRouter(tags=["tokens"])


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
async def tokenize(body: TokenizeRequest, request: Request):
    """Token ids of `prompt`, or of `messages` rendered with the chat template."""
    state = state_of(request)
    state.check_model(body.model)
    llm = state.llm
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "Give either 'prompt' or 'messages'.", "prompt")
    if body.prompt is not None:
        ids = list(llm.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"])
    else:
        messages = template_messages(body.messages)
        try:
            ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt,
                                                    tokenize=True)
        except Exception as exc:  # a template that refuses this conversation (e.g. role order)
            raise APIError(400, f"The chat template cannot render these messages: {exc}", "messages") from None
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    strs = llm.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=llm.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request):
    """The text of token ids (special tokens included, as they were given)."""
    state = state_of(request)
    state.check_model(body.model)
    vocab = state.llm.config.vocab_size
    bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"Token ids must be integers in [0, {vocab}); tokens.{bad} is {body.tokens[bad]}.",
                       f"tokens.{bad}")
    return DetokenizeResponse(prompt=state.llm.tokenizer.decode(body.tokens))


@router.get("/tokenizer_info", response_model=TokenizerInfo, responses=ERRORS)
async def tokenizer_info(request: Request):
    """The served model's special tokens, context length and chat template (text, or None)."""
    llm = state_of(request).llm
    tok = llm.tokenizer
    template = tok.chat_template
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    return TokenizerInfo(tokenizer_class=type(tok).__name__, eos_token=tok.eos_token, bos_token=tok.bos_token,
                         pad_token=tok.pad_token, unk_token=tok.unk_token, model_max_length=llm.max_model_len,
                         chat_template=template if isinstance(template, str) else None)
