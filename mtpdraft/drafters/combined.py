"""Combined drafter: prompt lookup when the text repeats itself, the MTP drafter otherwise.

The n-gram drafter's proposal is used when it continues a suffix match of at
least `min_match` tokens (loopy and copying text, where lookup is nearly free and
very accurate); otherwise the MTP drafter proposes, at most `mtp_len` tokens (a short
MTP draft where its acceptance falls fast, e.g. sampling: verifying one or two more
positions costs about as much as one). Both see every round, so the n-gram index
stays in sync. Lossless like any drafter: the target verifies.
"""

from __future__ import annotations

from .base import Draft, DraftContext, Drafter
from .ngram import NgramDrafter

FALLBACK_MIN_MATCH = 1  # "fallback:L": prompt lookup on any match, else a short MTP draft


class CombinedDrafter:
    def __init__(self, mtp: Drafter, ngram: NgramDrafter | None = None, min_match: int = 2,
                 mtp_len: int | None = None):
        self.ngram = ngram or NgramDrafter(max_ngram=max(3, min_match))
        if not 1 <= min_match <= self.ngram.max_ngram:
            raise ValueError(f"min_match must be in 1..{self.ngram.max_ngram}, got {min_match}")
        if mtp_len is not None and mtp_len < 1:
            raise ValueError(f"mtp_len must be >= 1, got {mtp_len}")
        self.mtp, self.min_match, self.mtp_len = mtp, min_match, mtp_len
        self.last = ""  # which drafter proposed the last round: "ngram" | "mtp" | ""
        self.rounds = {"ngram": 0, "mtp": 0}

    @classmethod
    def fallback(cls, mtp: Drafter, mtp_len: int) -> "CombinedDrafter":
        """The "fallback:L" variant: prompt lookup on any n-gram match, else an MTP draft of
        at most mtp_len tokens."""
        return cls(mtp, min_match=FALLBACK_MIN_MATCH, mtp_len=mtp_len)

    def propose(self, ctx: DraftContext, k: int) -> Draft:
        d = Draft(self.ngram.lookup(ctx.tokens, k, self.min_match))
        if d.tokens:
            self.last = "ngram"
        else:
            d = self.mtp.propose(ctx, min(k, self.mtp_len) if self.mtp_len else k)
            self.last = "mtp" if d.tokens else ""
        if self.last:
            self.rounds[self.last] += 1
        return d

    def observe(self, accepted: int, proposed: int) -> None:
        if self.last == "mtp":
            self.mtp.observe(accepted, proposed)
        elif self.last == "ngram":
            self.ngram.observe(accepted, proposed)


class ByTemperature:
    """`auto` when its greedy and sampled choices differ: one drafter for greedy requests,
    another (at most `max_sampled_len` tokens a round) for temperature > 0. A request keeps
    its temperature, so each request sees one of them throughout. None: no draft at that
    temperature (plain decoding measured fastest there)."""

    def __init__(self, greedy: Drafter | None, sampled: Drafter | None, max_sampled_len: int | None = None):
        if max_sampled_len is not None and max_sampled_len < 1:
            raise ValueError(f"max_sampled_len must be >= 1, got {max_sampled_len}")
        self.greedy, self.sampled, self.max_sampled_len = greedy, sampled, max_sampled_len
        self.last: Drafter | None = None

    def propose(self, ctx: DraftContext, k: int) -> Draft:
        sampled = ctx.sampling is not None and not ctx.sampling.greedy
        self.last = self.sampled if sampled else self.greedy
        if self.last is None:
            return Draft([])
        if sampled and self.max_sampled_len:
            k = min(k, self.max_sampled_len)
        return self.last.propose(ctx, k)

    def observe(self, accepted: int, proposed: int) -> None:
        if self.last is not None:
            self.last.observe(accepted, proposed)

    @property
    def rounds(self) -> dict:
        return getattr(self.last, "rounds", {})
