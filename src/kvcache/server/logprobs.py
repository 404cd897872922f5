"""Logprobs in OpenAI's JSON shapes: chat's `{"content": [...]}` and legacy completions'
`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`. A token's string is its id
decoded alone; `text_offset` counts characters into the choice's text."""

from __future__ import annotations

from kvcache.engine.logprobs import TokenLogprob


def _piece(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    """`choices[i].logprobs` of a chat completion (or of one chunk's new tokens)."""

    def one(token_id: int, logprob: float) -> dict:
        text = _piece(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_logprobs(tokenizer, token_ids: list[int], entries: list[TokenLogprob | None],
                        offset: int = 0) -> dict:
    """`choices[i].logprobs` of a text completion: one slot per token id (an entry of None, the
    prompt's first token, has null logprob and null top_logprobs); offsets start at `offset`."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, e in zip(token_ids, entries):
        text = _piece(tokenizer, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        token_logprobs.append(None if e is None else e.logprob)
        tops.append(None if e is None else {_piece(tokenizer, t): lp for t, lp in e.top})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
