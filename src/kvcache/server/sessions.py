"""Session endpoints: save a conversation's KV cache to disk, restore it into the prefix cache.

`POST /v1/sessions/{name}/save` takes chat messages (rendered without the reply prompt, as
the next request will resend them) or token ids; blocks not already in the prefix cache are
computed first. `POST /v1/sessions/{name}/load` checks the file (fingerprint, shapes,
checksum) and writes its full blocks into free KV blocks registered under their chained
hashes: the next request that starts with those tokens is a prefix-cache hit.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Request

from kvcache.engine.persist import SESSION_NAME, SessionNotFoundError, restore_prefix, snapshot_prefix
from kvcache.engine.sampling import SamplingParams
from kvcache.errors import KVCacheError
from kvcache.server.errors import APIError
from kvcache.server.routes import ERRORS, state_of
from kvcache.server.schemas import SessionList, SessionLoaded, SessionRequest, SessionSaved, template_messages
from kvcache.server.state import ServerState

router = APIRouter(tags=["sessions"])
SessionName = Annotated[str, Path(pattern=SESSION_NAME.pattern, description="letters, digits, '-', '_' (1-64)")]


def _history_ids(state: ServerState, body: SessionRequest) -> tuple[list[int], list[dict] | None]:
    llm = state.llm
    if (body.messages is None) == (body.token_ids is None):
        raise APIError(400, "Give either 'messages' or 'token_ids'.", "messages")
    if body.token_ids is not None:
        return llm.encode(body.token_ids), None
    messages = template_messages(body.messages)
    try:
        ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)
    except Exception as exc:
        raise APIError(400, f"The chat template cannot render these messages: {exc}", "messages") from None
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids), messages


def _check_float_blocks(state: ServerState) -> None:
    if not state.llm.engine.storage.saves_sessions:
        raise APIError(400, f"Sessions are saved from float KV blocks; this server holds its KV cache otherwise "
                       f"('{state.llm.kv_policy.text}').", "name", "sessions_unsupported")


@router.post("/v1/sessions/{name}/save", response_model=SessionSaved, responses=ERRORS)
async def save_session(name: SessionName, body: SessionRequest, request: Request):
    """Save the KV cache of a conversation's full blocks under `name` (safetensors + fingerprint)."""
    state = state_of(request)
    state.check_model(body.model)
    _check_float_blocks(state)
    ids, messages = _history_ids(state, body)
    bs = state.llm.engine.kv.block_size
    if len(ids) < bs:
        raise APIError(400, f"The conversation has {len(ids)} tokens, less than one {bs}-token KV block; "
                       "there is nothing to save.", "messages" if messages else "token_ids")
    if len(ids) >= state.llm.max_model_len:
        raise APIError(400, f"The conversation has {len(ids)} tokens, more than the context "
                       f"({state.llm.max_model_len}).", "messages" if messages else "token_ids")
    fp = state.store.fingerprint
    snap = await state.engine.call(lambda eng: snapshot_prefix(eng, ids, fp, messages))
    if snap is None:  # compute the missing blocks (one prefill), then read them
        state.admit()
        try:
            async for _ in state.engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0.0)):
                pass
        finally:
            state.release()
        snap = await state.engine.call(lambda eng: snapshot_prefix(eng, ids, fp, messages))
    if snap is None:
        raise APIError(503, "The KV cache evicted this conversation while saving it; try again.")
    size = await asyncio.to_thread(state.store.save, name, snap)
    return SessionSaved(name=name, num_tokens=snap.num_tokens, bytes=size)


@router.post("/v1/sessions/{name}/load", response_model=SessionLoaded, responses=ERRORS)
async def load_session(name: SessionName, request: Request):
    """Restore a saved session into the prefix cache (refused, untouched, if foreign or damaged)."""
    state = state_of(request)
    _check_float_blocks(state)
    try:
        snap = await asyncio.to_thread(state.store.load, name)
    except SessionNotFoundError as exc:
        raise APIError(404, str(exc), "name", "session_not_found") from None
    except KVCacheError as exc:
        raise APIError(400, str(exc), "name", "session_invalid") from None
    try:
        written, present = await state.engine.call(lambda eng: restore_prefix(eng, snap))
    except KVCacheError as exc:  # too few free blocks right now, or prefix caching off
        raise APIError(503, str(exc), code="kv_cache_busy", headers={"Retry-After": "1"}) from None
    return SessionLoaded(name=name, num_tokens=snap.num_tokens, blocks_restored=written, blocks_already_cached=present)


@router.get("/v1/sessions", response_model=SessionList, responses=ERRORS)
async def list_sessions(request: Request):
    """Saved sessions, with whether each fits this server's model, dtype and policy."""
    infos = await asyncio.to_thread(state_of(request).store.list)
    return SessionList(data=infos)


@router.delete("/v1/sessions/{name}", responses=ERRORS)
async def delete_session(name: SessionName, request: Request) -> dict:
    """Delete a saved session file."""
    path = state_of(request).store.path(name)
    if not path.is_file():
        raise APIError(404, f"No saved session named '{name}'.", "name", "session_not_found")
    path.unlink()
    return {"name": name, "deleted": True}
