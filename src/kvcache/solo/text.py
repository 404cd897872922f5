"""The solo runtime's tokenizer: the `tokenizers` library on a converted GGUF's tokenizer.json,
and the chat template rendered with jinja2 in the environment transformers renders it in (a
sandbox, blocks trimmed, loop controls, `tojson` without HTML escaping, `strftime_now`,
`raise_exception`, `{% generation %}` blocks). No torch."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from kvcache.engine.history import check_messages
from kvcache.errors import KVCacheError, ModelFormatError


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json gives it (a string or {"content": ...})."""
    return value.get("content") if isinstance(value, dict) else value


def template_environment():
    """A jinja2 environment that renders chat templates as transformers does."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` (marks the assistant's tokens): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class SoloTokenizer:
    """Encode, decode, and render conversations for one converted model folder."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            cfg = json.loads((folder / "tokenizer_config.json").read_text())
            model_cfg = json.loads((folder / "config.json").read_text())
        except Exception as exc:  # OSError, bad JSON, or the tokenizers library's own exception type
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

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        """{"input_ids": ids}, as a transformers tokenizer answers (code shared with the engine reads it)."""
        return {"input_ids": self.encode(text, add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """A prompt's ids, special tokens added as the tokenizer's post-processor adds them."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """A conversation rendered with the chat template, ready for the reply, as ids."""
        import jinja2

        check_messages(messages)
        if self.template_text is None:
            raise KVCacheError("this model has no chat template.")
        try:
            if self._template is None:
                self._template = template_environment().from_string(self.template_text)
            text = self._template.render(messages=messages, add_generation_prompt=True,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.TemplateError as exc:
            raise KVCacheError(f"The chat template could not render the conversation ({exc}).") from None
        return self.encode(text, add_special_tokens=False)
