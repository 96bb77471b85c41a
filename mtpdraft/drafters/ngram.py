"""Training-free prompt-lookup drafter: continue the latest earlier occurrence of
the longest suffix (max_ngram .. 1 tokens) of the text so far."""

from __future__ import annotations

from .base import Draft, DraftContext


class NgramDrafter:
    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._tokens: list[int] = []
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest continuation starts

    def _sync(self, tokens: list[int]) -> None:
        # committed text only grows within a generation; anything else is a new one
        if tokens[: len(self._tokens)] != self._tokens:
            self._tokens, self._index = [], {}
        start = len(self._tokens)
        self._tokens = list(tokens)
        # index every n-gram that now has a continuation (ends before the last token)
        for end in range(max(start, 1), len(tokens)):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end - n >= 0:
                    self._index[tuple(tokens[end - n:end])] = end

    def lookup(self, tokens: list[int], k: int, min_ngram: int | None = None) -> list[int]:
        """Up to k tokens continuing the longest suffix match of at least min_ngram tokens."""
        self._sync(tokens)
        toks = self._tokens
        for n in range(self.max_ngram, (min_ngram or self.min_ngram) - 1, -1):
            if len(toks) < n:
                continue
            start = self._index.get(tuple(toks[-n:]))
            if start is not None:
                return toks[start:start + k]
        return []

    def propose(self, ctx: DraftContext, k: int) -> Draft:
        return Draft(self.lookup(ctx.tokens, k))

    def observe(self, accepted: int, proposed: int) -> None:
        pass
