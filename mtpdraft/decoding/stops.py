"""When to stop: EOS ids, stop strings, the token budget, the context. Fed one token
at a time, so plain and speculative decoding stop at exactly the same token.

There is one text: the generated ids decoded with special tokens skipped. Stop strings
are searched in it, the final text is cut from it, and `stable_text()` (what a stream
may send before the end) is always a prefix of the final text.
"""

from __future__ import annotations

from ..config import SamplingParams

# Characters before the previous text's end that a new token may still rewrite
# (e.g. a decoder's clean-up of the space before punctuation).
_REWRITE_MARGIN = 16


class StopChecker:
    def __init__(self, sp: SamplingParams, eos_ids: set[int], tokenizer=None):
        if sp.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.sp, self.eos_ids, self.tok = sp, set() if sp.ignore_eos else set(eos_ids), tokenizer
        self.ids: list[int] = []
        self.reason: str | None = None  # "eos" | "stop" | "length"
        self.text_end: int | None = None  # where a stop string starts in the decoded text
        self._text, self._text_n = "", 0  # the decoded text of ids[:_text_n]
        self._searched = 0  # stop strings cannot start before this in any later text

    def add(self, token: int) -> bool:
        """Record one generated token; True when generation must end after it."""
        self.ids.append(token)
        if token in self.eos_ids:
            self.reason = "eos"
        elif self.sp.stop and self._hit_stop():
            self.reason = "stop"
        elif len(self.ids) >= self.sp.max_new_tokens:
            self.reason = "length"
        return self.reason is not None

    def finish(self, reason: str) -> None:
        """End for a reason the checker cannot see (e.g. the context is full)."""
        self.reason = self.reason or reason

    def _decoded(self) -> str:
        if self._text_n != len(self.ids):
            self._text, self._text_n = self.tok.decode(self.ids, skip_special_tokens=True), len(self.ids)
        return self._text

    def _hit_stop(self) -> bool:
        # A new match must end in the new text, which may be longer than any window
        # counted from the end (one token can decode to many characters).
        text = self._decoded()
        hits = [i for s in self.sp.stop if (i := text.find(s, self._searched)) >= 0]
        if hits:
            self.text_end = min(hits)
            return True
        longest = max(len(s) for s in self.sp.stop)
        self._searched = max(0, len(text.rstrip("\ufffd")) - longest + 1 - _REWRITE_MARGIN)
        return False

    def text(self) -> str:
        """Generated text, cut before the stop string (EOS tokens are not rendered)."""
        if self.tok is None:
            return ""
        text = self._decoded()
        return text[: self.text_end] if self.reason == "stop" else text

    def stable_text(self) -> str:
        """The part of text() that no later token can change: all of it once finished;
        before that, without an incomplete character or a tail that could begin a stop string."""
        if self.reason is not None or self.tok is None:
            return self.text()
        text = self._decoded().rstrip("\ufffd")
        hold = max(_stop_prefix_len(text, s) for s in self.sp.stop) if self.sp.stop else 0
        return text[:len(text) - hold]


def _stop_prefix_len(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    i = text.find(stop[0], max(0, len(text) - len(stop) + 1))
    while i >= 0:
        if stop.startswith(text[i:]):
            return len(text) - i
        i = text.find(stop[0], i + 1)
    return 0
