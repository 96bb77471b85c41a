"""When to stop: EOS ids, stop strings, the token budget. Fed one token at a time,
so plain and speculative decoding stop at exactly the same token."""

from __future__ import annotations

from ..config import SamplingParams


class StopChecker:
    def __init__(self, sp: SamplingParams, eos_ids: set[int], tokenizer=None):
        if sp.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.sp, self.eos_ids, self.tok = sp, set() if sp.ignore_eos else set(eos_ids), tokenizer
        self.ids: list[int] = []
        self.reason: str | None = None  # "eos" | "stop" | "length"
        self.text_end: int | None = None  # where a stop string starts in the decoded text

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

    def _hit_stop(self) -> bool:
        # Only the tail can complete a new match: decode a window of recent tokens.
        longest = max(len(s) for s in self.sp.stop)
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        tail_from = max(0, len(text) - longest - 16)
        hits = [i for s in self.sp.stop if (i := text.find(s, tail_from)) >= 0]
        if hits:
            self.text_end = min(hits)
            return True
        return False

    def text(self) -> str:
        """Generated text, cut before the stop string (EOS tokens are not rendered)."""
        text = self.tok.decode(self.ids, skip_special_tokens=True) if self.tok else ""
        if self.reason == "stop":
            full = self.tok.decode(self.ids, skip_special_tokens=False)
            return full[: self.text_end]
        return text
