"""Structured output: a request's JSON schema as a token mask, advanced token by token.

`Grammars` compiles a request's `SamplingParams.json_schema` (or `json_object`) once per
schema with xgrammar, over the model's vocabulary (special tokens are never allowed, stop
tokens only where the grammar may end). Each such request gets a `GrammarState`: its own
matcher and the mask of the tokens it may take next. `mask_rows` applies the masks of a
step's grammar rows in one batched `masked_fill`; rows without a grammar are not touched.
The state ends a request once its JSON is complete (nothing but a stop token could follow).
"""

from __future__ import annotations

import json
import re
import threading

import torch

from kvcache.errors import KVCacheError

JSON_OBJECT_SCHEMA = {"type": "object"}  # response_format json_object: any JSON object
_BITS = 32  # xgrammar packs a mask into int32 words


def grammar_key(json_schema, json_object: bool) -> str | None:
    """The canonical text of a request's grammar (the cache key), None when it has none."""
    if json_schema is not None:
        return json.dumps(json_schema)  # key order kept: it is the properties' order
    if json_object:
        return json.dumps(JSON_OBJECT_SCHEMA)
    return None


def _reason(exc: Exception) -> str:
    """xgrammar's message without its '[time] file:line:' prefix, as one line."""
    text = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(exc).strip())
    text = re.sub(r"^Check failed: \(.*?\) is false:\s*", "", text)
    text = " ".join(text.split()).rstrip(".")
    return text[:300] or type(exc).__name__


# xgrammar 0.2.9 lets a string with minLength/maxLength hold raw control characters (only \r and
# \n are excluded there), which JSON forbids; such strings get JSON's own character class.
_LOOSE_CHARS = '[^\\"\\\\\\r\\n]'
_JSON_CHARS = '[^\\"\\\\\\0-\\x1f]'


def _no_raw_controls(xgr, grammar):
    """`grammar` with the loose character class of length-bounded strings made JSON's."""
    text = str(grammar)
    if _LOOSE_CHARS not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_CHARS, _JSON_CHARS))


class Grammars:
    """Compiles grammars for one tokenizer and vocabulary; thread-safe, one compile per schema."""

    def __init__(self, tokenizer, vocab_size: int):
        import xgrammar

        self._xgr = xgrammar
        special = {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
        special |= set(getattr(tokenizer, "all_special_ids", []))
        encoded = [""] * vocab_size  # an empty entry is a special token: never allowed by the grammar
        for text, i in tokenizer.get_vocab().items():
            if 0 <= i < vocab_size and i not in special:
                encoded[i] = text
        probe = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.info = xgrammar.TokenizerInfo(encoded, probe.vocab_type, vocab_size=vocab_size,
                                           stop_token_ids=probe.stop_token_ids,
                                           add_prefix_space=probe.add_prefix_space)
        self.vocab_size = vocab_size
        self._compiler = xgrammar.GrammarCompiler(self.info, max_threads=1)
        self._compiled: dict[str, object] = {}
        self._lock = threading.Lock()

    def compile(self, params):
        """The compiled grammar of `params` (None when it asks for none); a schema that does not
        compile raises `KVCacheError` in one sentence."""
        key = grammar_key(params.json_schema, params.json_object)
        if key is None:
            return None
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is None:
                try:
                    grammar = self._xgr.Grammar.from_json_schema(key, any_whitespace=False)
                except Exception as exc:  # xgrammar raises RuntimeError (and others) on a bad schema
                    raise KVCacheError(f"The JSON schema cannot be used: {_reason(exc)}.") from None
                compiled = self._compiler.compile_grammar(_no_raw_controls(self._xgr, grammar))
                self._compiled[key] = compiled
            return compiled

    def state(self, params, stop_ids) -> GrammarState | None:
        """A fresh `GrammarState` for a request (None when it asks for no grammar); `stop_ids`
        are the tokens that end it, allowed once its JSON is complete."""
        compiled = self.compile(params)
        if compiled is None:
            return None
        return GrammarState(self._xgr, compiled, sorted(stop_ids), self.vocab_size)


class GrammarState:
    """One request's matcher and the mask of its next token ((W,) int32 bits, filled after
    every accepted token)."""

    def __init__(self, xgr, compiled, stop_ids: list[int], vocab_size: int):
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_ids or None)
        self.stop_ids = stop_ids
        self.vocab_size = vocab_size
        self._fill = xgr.GrammarMatcher.fill_next_token_bitmask
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # (1, W) int32
        self._refill()

    def _refill(self) -> None:
        if not self.matcher.is_terminated():
            self._fill(self.matcher, self.bitmask, 0)

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens the grammar allows next."""
        return unpack_bits(self.bitmask, self.vocab_size)[0]

    def accept(self, token: int) -> None:
        """Advance past a sampled token (one the mask allowed)."""
        if self.matcher.is_terminated():
            return
        if not self.matcher.accept_token(token):
            raise KVCacheError(f"Token {token} does not follow the request's grammar.")
        self._refill()

    @property
    def finished(self) -> bool:
        """The JSON is complete: a stop token was taken, or nothing else may follow."""
        if self.matcher.is_terminated():
            return True
        if not self.matcher.is_completed():
            return False
        rest = self.allowed()  # (V,)
        rest[self.stop_ids] = False
        return not bool(rest.any())


def unpack_bits(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, W) int32 words -> (B, vocab_size) bool, bit j of word w is token w*32 + j."""
    shifts = torch.arange(_BITS, dtype=torch.int32, device=bitmask.device)  # (32,)
    bits = (bitmask[:, :, None] >> shifts) & 1  # (B, W, 32)
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()  # (B, V)


def mask_rows(states: list[GrammarState], logits: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each row's logits (V,) with the tokens its grammar forbids at -inf (new tensors, one
    batched fill; the logits given are left as they were)."""
    if not states:
        return []
    stacked = torch.stack(logits)  # (B, V)
    words = torch.cat([s.bitmask for s in states]).to(stacked.device)  # (B, W)
    allowed = unpack_bits(words, stacked.shape[-1])  # (B, V)
    return list(stacked.masked_fill(~allowed, float("-inf")).unbind(0))
