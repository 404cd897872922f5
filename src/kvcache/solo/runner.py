"""Generation in the solo runtime: sampling on numpy logits, a prompt's tokens streamed as text,
and a conversation whose earlier turns stay in the model's K/V (only a turn's new tokens run)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from kvcache.errors import KVCacheError
from kvcache.solo.model import SoloModel
from kvcache.solo.text import SoloTokenizer


@dataclass
class SoloSampling:
    """How tokens are picked: temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # run to max_tokens past end tokens (benchmarks)

    def __post_init__(self):
        if self.max_tokens < 1:
            raise KVCacheError(f"max_tokens must be a positive integer, got {self.max_tokens}.")
        if not self.temperature >= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise KVCacheError("temperature must be >= 0, top_p in (0, 1] and top_k >= 0.")

    def picker(self, model: SoloModel):
        """A function logits (V,) -> token id, with its own seeded generator."""
        if self.temperature == 0:
            return model.argmax
        rng = np.random.default_rng(self.seed)

        def pick(logits: np.ndarray) -> int:
            z = logits.astype(np.float64) / self.temperature  # (V,)
            if self.top_k and self.top_k < z.size:
                z[z < np.partition(z, -self.top_k)[-self.top_k]] = -np.inf
            p = np.exp(z - z.max())
            p /= p.sum()
            if self.top_p < 1:
                order = np.argsort(-p, kind="stable")
                before = np.cumsum(p[order]) - p[order]  # mass ahead of each token
                p[order[before >= self.top_p]] = 0  # keep the smallest set reaching top_p
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

    def __init__(self, model: SoloModel, tokenizer: SoloTokenizer):
        self.model, self.tokenizer = model, tokenizer

    def stream(self, prompt_ids: list[int], sampling: SoloSampling) -> Iterator[str | SoloOutput]:
        """Text pieces as they decode, then the `SoloOutput`. The K/V the model holds for the longest
        common prefix of `prompt_ids` and what it held is reused; one token is always recomputed."""
        m = self.model
        if not prompt_ids:
            raise KVCacheError("the prompt is empty.")
        if len(prompt_ids) + sampling.max_tokens > m.max_len:
            raise KVCacheError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_tokens}) is more "
                               f"than the context of {m.max_len} tokens.")
        keep, held = 0, m.tokens
        while keep < min(len(held), len(prompt_ids) - 1) and held[keep] == prompt_ids[keep]:
            keep += 1
        m.truncate(keep)
        pick = sampling.picker(m)
        t0 = time.perf_counter()
        logits = m.forward(prompt_ids[keep:])
        t1 = time.perf_counter()
        out: list[int] = []
        text, reason = "", "length"
        while True:
            token = pick(logits)
            if token in self.tokenizer.end_ids and not sampling.ignore_eos:
                reason = "stop"
                break
            out.append(token)
            new = self.tokenizer.decode(out)
            if not new.endswith("\ufffd"):  # a character still incomplete waits for its next bytes
                hit = min((i for i in (new.find(s, max(0, len(text) - len(s))) for s in sampling.stop) if i >= 0),
                          default=-1)
                if hit >= 0:
                    new, reason = new[:hit], "stop"
                if len(new) > len(text):
                    yield new[len(text):]
                text = new
                if reason == "stop":
                    break
            if len(out) == sampling.max_tokens:
                break
            logits = m.forward([token])
        yield SoloOutput(out, text, reason, len(prompt_ids), keep, t1 - t0, time.perf_counter() - t1)

    def generate(self, prompt_ids: list[int], sampling: SoloSampling) -> SoloOutput:
        """The whole reply at once."""
        *_, last = self.stream(prompt_ids, sampling)
        return last


class SoloChat:
    """A conversation: each turn renders the whole history with the chat template, and only the
    tokens after what the model already holds run."""

    def __init__(self, generator: SoloGenerator, system: str | None = None):
        self.generator = generator
        self.system = system
        self.messages: list[dict] = []
        self.last_output: SoloOutput | None = None

    def reset(self) -> None:
        self.messages = []

    def stream(self, text: str, sampling: SoloSampling) -> Iterator[str | SoloOutput]:
        """The reply to `text`, streamed; the turn joins the history once it is complete."""
        history = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        turn = [{"role": "user", "content": text}]
        ids = self.generator.tokenizer.chat_ids(history + turn)
        for piece in self.generator.stream(ids, sampling):
            if isinstance(piece, str):
                yield piece
            else:
                self.last_output = piece
                self.messages += turn + [{"role": "assistant", "content": piece.text}]
                yield piece

    def stats(self) -> dict:
        m = self.generator.model
        kv = m.kv_bytes()  # only the filled positions' pages are ever touched: allocated = held
        return {"turns": len(self.messages) // 2, "cached_tokens": m.length, "kv_cache_bytes": kv,
                "kv_cache_allocated_bytes": kv, "truncations": 0, "summaries": 0, "weights_bytes": m.weights.nbytes}
