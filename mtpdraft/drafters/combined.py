"""Combined drafter: prompt lookup when the text repeats itself, the MTP drafter otherwise
(with a datastore: lookup in the target's own writing between the two).

The n-gram drafter's proposal is used when it continues a suffix match of at
least `min_match` tokens (loopy and copying text, where lookup is nearly free and
very accurate); otherwise the MTP drafter proposes, at most `mtp_len` tokens (a short
MTP draft where its acceptance falls fast, e.g. sampling: verifying one or two more
positions costs about as much as one). With `store`, a suffix of at least its
min_match tokens found in the datastore (drafters/datastore.py) proposes before the MTP
drafter. The n-gram index sees every round, so it stays in sync. Lossless like any drafter: the target verifies.
"""

from __future__ import annotations

from ..config import DEFAULT_DRAFT_LEN, SamplingParams
from .base import Draft, DraftContext, Drafter
from .datastore import DatastoreDrafter
from .ngram import NgramDrafter

FALLBACK_MIN_MATCH = 1  # "fallback:L": prompt lookup on any match, else a short MTP draft


class CombinedDrafter:
    def __init__(self, mtp: Drafter | None, ngram: NgramDrafter | None = None, min_match: int = 2,
                 mtp_len: int | None = None, store: DatastoreDrafter | None = None):
        self.ngram = ngram or NgramDrafter(max_ngram=max(3, min_match))
        if not 1 <= min_match <= self.ngram.max_ngram:
            raise ValueError(f"min_match must be in 1..{self.ngram.max_ngram}, got {min_match}")
        if mtp_len is not None and mtp_len < 1:
            raise ValueError(f"mtp_len must be >= 1, got {mtp_len}")
        self.mtp, self.min_match, self.mtp_len, self.store = mtp, min_match, mtp_len, store
        self.last = ""  # which drafter proposed the last round: "ngram" | "datastore" | "mtp" | ""
        self.rounds = {"ngram": 0, "mtp": 0, "datastore": 0}

    @classmethod
    def fallback(cls, mtp: Drafter, mtp_len: int) -> "CombinedDrafter":
        """The "fallback:L" variant: prompt lookup on any n-gram match, else an MTP draft of
        at most mtp_len tokens."""
        return cls(mtp, min_match=FALLBACK_MIN_MATCH, mtp_len=mtp_len)

    def propose(self, ctx: DraftContext, k: int) -> Draft:
        d = Draft(self.ngram.lookup(ctx.tokens, k, self.min_match))
        self.last = "ngram" if d.tokens else ""
        if not d.tokens and self.store is not None:
            d = Draft(self.store.lookup(ctx.tokens, k))
            self.last = "datastore" if d.tokens else ""
        if not d.tokens and self.mtp is not None:
            d = self.mtp.propose(ctx, min(k, self.mtp_len) if self.mtp_len else k)
            self.last = "mtp" if d.tokens else ""
        if self.last:
            self.rounds[self.last] += 1
        return d

    def observe(self, accepted: int, proposed: int) -> None:
        if self.last == "mtp":
            self.mtp.observe(accepted, proposed)
        elif self.last:
            (self.ngram if self.last == "ngram" else self.store).observe(accepted, proposed)


class ByTemperature:
    """`auto` with settings per temperature: one drafter for greedy requests, drafting
    `greedy_len` tokens a round, another (`sampled_len`) for temperature > 0. A length is the
    one its variant was chosen with: a request that sets none drafts that many, one that sets
    more is capped to it (None: the request's, else DEFAULT_DRAFT_LEN). A request keeps its
    temperature, so each request sees one of them throughout. A drafter None: no draft at that
    temperature (plain decoding measured fastest there; `for_request` then gives the request
    no drafter at all)."""

    def __init__(self, greedy: Drafter | None, sampled: Drafter | None, *, greedy_len: int | None = None,
                 sampled_len: int | None = None):
        for name, v in (("greedy_len", greedy_len), ("sampled_len", sampled_len)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.greedy, self.sampled = greedy, sampled
        self.greedy_len, self.sampled_len = greedy_len, sampled_len
        self.last: Drafter | None = None

    def choice(self, sampling: SamplingParams | None) -> tuple[Drafter | None, int | None]:
        """(drafter, its draft length) for requests with these sampling settings."""
        if sampling is not None and not sampling.greedy:
            return self.sampled, self.sampled_len
        return self.greedy, self.greedy_len

    def propose(self, ctx: DraftContext, k: int) -> Draft:
        self.last, cap = self.choice(ctx.sampling)
        if self.last is None:
            return Draft([])
        return self.last.propose(ctx, min(k, cap) if cap else k)

    def observe(self, accepted: int, proposed: int) -> None:
        if self.last is not None:
            self.last.observe(accepted, proposed)

    @property
    def rounds(self) -> dict:
        return getattr(self.last, "rounds", {})


def draft_len_for(drafter: Drafter | None, sampling: SamplingParams, requested: int | None) -> int:
    """A request's draft length: `requested`, capped to auto's own length at its temperature;
    with none requested, auto's own, else DEFAULT_DRAFT_LEN. 0 without a drafter."""
    if drafter is None:
        return 0
    own = drafter.choice(sampling)[1] if isinstance(drafter, ByTemperature) else None
    k = requested or own or DEFAULT_DRAFT_LEN
    return min(k, own) if own else k


def for_request(drafter: Drafter | None, sampling: SamplingParams) -> Drafter | None:
    """The drafter a request with these sampling settings decodes with: None where `auto`
    drafts nothing at its temperature (the request is plain decoding, and says so)."""
    if isinstance(drafter, ByTemperature) and drafter.choice(sampling)[0] is None:
        return None
    return drafter
