"""Incremental detokenization with stop strings, for streaming text as tokens arrive."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Turns a growing list of generated ids into safe text deltas.

    Text is held back while it ends in an incomplete UTF-8 character (shown as U+FFFD)
    or could still be the start of a stop string; a stop string ends the text before it.
    Each call decodes only the ids since the last complete character, with the few before
    them as context (so a tokenizer that treats a leading piece specially decodes it alike
    both times): O(1) per token instead of decoding the whole output again.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = stop or []
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # full decoded text so far (up to a stop string)
        self.emitted = 0  # characters already handed out
        self.stopped = False
        self._start = 0  # ids[_start:_mark]: the context decoded before the new ids
        self._mark = 0  # ids[:_mark] are decoded into _done, ending on a complete character
        self._done = ""

    def add(self, token_id: int) -> str:
        """Add one id; return the new text that is safe to show now."""
        self.ids.append(token_id)
        head = self.tokenizer.decode(self.ids[self._start : self._mark], skip_special_tokens=True)
        window = self.tokenizer.decode(self.ids[self._start :], skip_special_tokens=True)
        if window.startswith(head):
            text = self._done + window[len(head) :]
        else:  # the new ids changed how the context decodes (e.g. space clean-up): decode it all
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        tail = text[len(self._done) :]
        if not tail.endswith("\ufffd"):  # complete: the next call decodes from here
            self._done, self._start, self._mark = text, self._mark, len(self.ids)
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
