"""The solo runtime's tokenizer: the `tokenizers` library on a converted GGUF's tokenizer.json, the
chat template rendered with jinja2 as transformers renders it (sandboxed, blocks trimmed). No torch."""

from __future__ import annotations

import json
from pathlib import Path

from kvcache.errors import KVCacheError, ModelFormatError


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json gives it (a string or {"content": ...})."""
    return value.get("content") if isinstance(value, dict) else value


class SoloTokenizer:
    """Encode, decode, and render conversations for one model folder."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            cfg = json.loads((folder / "tokenizer_config.json").read_text())
            model_cfg = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError, Exception) as exc:  # tokenizers raises its own Exception subclass
            raise ModelFormatError(f"Could not load the tokenizer in {folder} ({exc}).") from None
        template_file = folder / "chat_template.jinja"
        self.template_text = template_file.read_text() if template_file.is_file() else cfg.get("chat_template")
        self.bos_token, self.eos_token = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
        eos = model_cfg.get("eos_token_id")
        ends = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.eos_token is not None and self.tokenizer.token_to_id(self.eos_token) is not None:
            ends.add(self.tokenizer.token_to_id(self.eos_token))
        self.end_ids = frozenset(ends)  # a generated token among these ends the reply
        self._template = None

    def encode(self, text: str) -> list[int]:
        """A prompt's ids, special tokens added as the tokenizer's post-processor adds them."""
        return self.tokenizer.encode(text).ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        """{"input_ids": ids}, as a transformers tokenizer answers (code shared with the engine reads it)."""
        return {"input_ids": self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """A conversation rendered with the chat template, ready for the reply, as ids."""
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
                raise KVCacheError("Each message must be a dict with a 'role' and a string 'content'.")
        if self.template_text is None:
            raise KVCacheError("this model has no chat template.")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise KVCacheError(f"the chat template refused the conversation: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.template_text)
        text = self._template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token or "",
                                     eos_token=self.eos_token or "")
        return self.tokenizer.encode(text, add_special_tokens=False).ids
