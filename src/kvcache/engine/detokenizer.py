"""Incremental detokenization with stop strings, for streaming text as tokens arrive."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Turns a growing list of generated ids into safe text deltas.

    Text is held back while it ends in an incomplete UTF-8 character (shown as U+FFFD)
    or could still be the start of a stop string; a stop string ends the text before it.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = stop or []
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # full decoded text so far (up to a stop string)
        self.emitted = 0  # characters already handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Add one id; return the new text that is safe to show now."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.text, self.stopped = text[:at], True
                return self.flush()
        self.text = text
        safe = len(text) - self.hold
        if text.endswith("\ufffd"):
            safe = min(safe, len(text.rstrip("\ufffd")))
        if safe <= self.emitted:
            return ""
        delta = text[self.emitted : safe]
        self.emitted = safe
        return delta

    def flush(self) -> str:
        """The rest of the text, at the end of generation."""
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta
