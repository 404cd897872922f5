"""Generation in the solo runtime: the engine's `SamplingParams` (the subset one sequence without
torch runs) applied to numpy logits, text streamed through the engine's incremental detokenizer
(stop strings held back until they cannot match), and a conversation fitted to its budget by the
engine's history rule whose earlier turns stay in the model's K/V (only a turn's new tokens run)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from kvcache.engine.detokenizer import IncrementalDetokenizer
from kvcache.engine.history import OVERFLOW_POLICIES, fit_history
from kvcache.engine.length_rule import check_length
from kvcache.engine.sampling_params import SamplingParams
from kvcache.errors import KVCacheError
from kvcache.solo.model import SoloModel

#: SamplingParams fields the runtime does not run, with the value that means "off".
_UNSUPPORTED = {"repetition_penalty": 1.0, "logprobs": None, "prompt_logprobs": None, "n": 1, "json_schema": None,
                "json_object": False}


def check_supported(params: SamplingParams) -> None:
    """One sentence for a sampling option the solo runtime does not run."""
    for name, off in _UNSUPPORTED.items():
        if getattr(params, name) != off:
            raise KVCacheError(f"the solo runtime does not run {name}; use the engine (kvcache.LLM).")


def token_picker(params: SamplingParams, model: SoloModel):
    """A function logits (V,) -> token id: greedy (the kernels' argmax), or temperature, top-k and
    top-p as the engine's sampler applies them, from its own seeded generator."""
    if params.greedy:
        return model.argmax
    rng = np.random.default_rng(params.seed)

    def pick(logits: np.ndarray) -> int:
        z = logits.astype(np.float64) / params.temperature  # (V,)
        if params.top_k and params.top_k < z.size:
            z[z < np.partition(z, -params.top_k)[-params.top_k]] = -np.inf
        p = np.exp(z - z.max())
        p /= p.sum()
        if params.top_p < 1:
            order = np.argsort(-p, kind="stable")
            before = np.cumsum(p[order]) - p[order]  # mass ahead of each token
            p[order[before >= params.top_p]] = 0  # keep the smallest set reaching top_p
            p /= p.sum()
        return int(rng.choice(p.size, p=p))

    return pick


@dataclass
class SoloOutput:
    """One reply: its tokens and text, why it ended, and its timings."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (an end token or a stop string) | "length"
    prompt_tokens: int
    cached_prompt_tokens: int  # prompt tokens whose K/V an earlier turn left
    ttft_s: float  # the prompt's forward pass, which gives the first token
    decode_s: float  # every later token

    @property
    def decode_tok_s(self) -> float:
        return (len(self.token_ids) - 1) / self.decode_s if self.decode_s > 0 and len(self.token_ids) > 1 else 0.0

    @property
    def metrics(self) -> "SoloOutput":
        """The figures under the names of the engine's `RequestMetrics` (the chat front end reads either)."""
        return self


class SoloGenerator:
    """A model and its tokenizer: prompts in, streamed text out."""

    def __init__(self, model: SoloModel, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[str | SoloOutput]:
        """Text pieces as they decode, then the `SoloOutput`. The K/V the model holds for the longest
        common prefix of `prompt_ids` and what it held is reused; one token is always recomputed."""
        m = self.model
        check_supported(params)
        if not prompt_ids:
            raise KVCacheError("The prompt is empty.")
        check_length(params.max_tokens, m.max_len, len(prompt_ids))
        keep, held = 0, m.tokens
        while keep < min(len(held), len(prompt_ids) - 1) and held[keep] == prompt_ids[keep]:
            keep += 1
        m.truncate(keep)
        pick = token_picker(params, m)
        ends = set() if params.ignore_eos else set(self.tokenizer.end_ids)
        ends |= set(params.stop_token_ids)
        detok = IncrementalDetokenizer(self.tokenizer, params.stop)
        t0 = time.perf_counter()
        logits = m.forward(prompt_ids[keep:])
        t1 = time.perf_counter()
        out: list[int] = []
        reason = "length"
        while True:
            token = pick(logits)
            if token in ends:
                reason = "stop"
                break
            out.append(token)
            piece = detok.add(token)
            if piece:
                yield piece
            if detok.stopped:
                reason = "stop"
                break
            if len(out) == params.max_tokens:
                break
            logits = m.forward([token])
        rest = detok.flush()
        if rest:
            yield rest
        yield SoloOutput(out, detok.text, reason, len(prompt_ids), keep, t1 - t0, time.perf_counter() - t1)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> SoloOutput:
        """The whole reply at once."""
        *_, last = self.stream(prompt_ids, params)
        return last


class SoloChat:
    """A conversation: each turn renders the whole history with the chat template, fitted to the
    budget (`overflow` "truncate" drops the oldest turns, "error" refuses; `max_history_tokens`,
    default the context), and only the tokens after what the model already holds run."""

    def __init__(self, generator: SoloGenerator, system: str | None = None, overflow: str = "truncate",
                 max_history_tokens: int | None = None):
        limit = generator.model.max_len
        if overflow not in OVERFLOW_POLICIES or overflow == "summarize":
            raise KVCacheError(f"the solo runtime's overflow is truncate or error, got '{overflow}'.")
        if max_history_tokens is not None and not 0 < max_history_tokens <= limit:
            raise KVCacheError(f"max_history_tokens must be in [1, {limit}], got {max_history_tokens}.")
        self.generator, self.system, self.overflow = generator, system, overflow
        self.budget = max_history_tokens or limit
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the model's K/V is overwritten by the next turn)."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.turns = self.truncations = 0
        self.last_output: SoloOutput | None = None

    def stream(self, text: str, params: SamplingParams) -> Iterator[str | SoloOutput]:
        """The reply to `text`, streamed; the turn joins the history once it is complete."""
        if not isinstance(text, str) or not text.strip():
            raise KVCacheError("The message is empty.")
        check_length(params.max_tokens, self.generator.model.max_len)
        messages, ids, remedy = fit_history(self.messages + [{"role": "user", "content": text}],
                                            self.generator.tokenizer.chat_ids, params.max_tokens, self.budget,
                                            self.overflow)
        for piece in self.generator.stream(ids, params):
            if isinstance(piece, str):
                yield piece
                continue
            self.messages = messages + [{"role": "assistant", "content": piece.text}]
            self.turns += 1
            self.truncations += int(remedy == "truncated")
            self.last_output = piece
            yield piece

    def send(self, text: str, params: SamplingParams) -> SoloOutput:
        *_, last = self.stream(text, params)
        return last

    def stats(self) -> dict:
        """Turns, the positions the model holds, their K/V bytes and the pages ever written."""
        m = self.generator.model
        return {"turns": self.turns, "cached_tokens": m.length, "kv_cache_bytes": m.kv_bytes(),
                "kv_cache_allocated_bytes": m.kv_bytes(m.high_water), "truncations": self.truncations,
                "summaries": 0, "weights_bytes": m.weights.nbytes}
