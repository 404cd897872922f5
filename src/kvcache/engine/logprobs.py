"""Log-probabilities of chosen tokens and their top alternatives.

They are the log-softmax of the model's raw logits at each position (before repetition
penalty, temperature, top-k/top-p), as vLLM reports by default: what a client scoring text
(e.g. an evaluation harness) compares against other backends. Nothing here runs for a
request that did not ask for logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenLogprob:
    """One position: the token there, its log-probability and the `top` most likely tokens."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The entry for `token` under logits (V,), with the k most likely tokens."""
    lp = logits.float().log_softmax(-1)  # (V,)
    return TokenLogprob(token, float(lp[token]), _top(lp, k))


def prompt_logprobs(model, ids: list[int], k: int) -> list[TokenLogprob | None]:
    """Each prompt token's entry given the tokens before it (None for the first), from one
    forward over the whole prompt without any cache (prefix-cache hits are not used here)."""
    from kvcache.models.step import StepInputs

    with torch.inference_mode():
        x = torch.tensor([ids], device=model.device)  # (1, T)
        logits = model.forward(StepInputs(x, None, 0, None, logits_for="all"), None)[0]  # (T, V)
        lp = logits[:-1].float().log_softmax(-1)  # (T-1, V): position t predicts token t+1
        nxt = x[0, 1:]  # (T-1,)
        chosen = lp.gather(-1, nxt[:, None])[:, 0].tolist()  # (T-1,)
        tops = _top_rows(lp, k)
    return [None] + [TokenLogprob(t, c, top) for t, c, top in zip(ids[1:], chosen, tops)]


def _top(lp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    vals, idx = torch.topk(lp, min(k, lp.shape[-1]))  # (k,)
    return list(zip(idx.tolist(), vals.tolist()))


def _top_rows(lp: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    if k <= 0:
        return [[] for _ in range(lp.shape[0])]
    vals, idx = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)  # (T, k)
    return [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
