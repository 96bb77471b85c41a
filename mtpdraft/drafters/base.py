"""The one interface every drafter implements; the loop never asks which it has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..cache import KVCache
from ..config import SamplingParams
from ..models.base import CausalLM


@dataclass
class DraftContext:
    """What a drafter may read at the start of a round.

    tokens: every committed token (prompt + generated); the last one, tokens[-1],
      has been chosen but not yet run through the target.
    hidden: [D] the target's final hidden state at the last verified position
      (the one whose logits chose tokens[-1]).
    cache/row: the target's KV cache; positions < cache.lengths[row] are verified.
    sampling/generator: the request's settings and random stream. At temperature > 0 a
      drafter with a distribution of its own may sample from it and return it as
      Draft.probs (verification then accepts with min(1, p/q), exact for any q).
    """

    tokens: list[int]
    hidden: torch.Tensor
    target: CausalLM
    cache: KVCache
    row: int = 0
    sampling: SamplingParams | None = None
    generator: torch.Generator | None = None


@dataclass
class Draft:
    """Proposed tokens and q, the distribution each was drawn from: probs None = argmax
    (a point mass); else probs [len(tokens), V], or, with `support` [len(tokens), C]
    (distinct token ids per row), probs [len(tokens), C] over those ids and 0 elsewhere:
    a clustered head's few thousand candidates instead of a mostly-zero [n, 262144]."""

    tokens: list[int]
    probs: torch.Tensor | None = None
    support: torch.Tensor | None = None

    def dense_probs(self, vocab_size: int) -> torch.Tensor | None:
        """q as [len(tokens), vocab_size] (None for argmax drafts)."""
        if self.probs is None or self.support is None:
            return self.probs
        return torch.zeros(len(self.tokens), vocab_size).scatter_(1, self.support, self.probs.float())

    def first(self, k: int) -> "Draft":
        """The draft's first k tokens, with their q."""
        cut = lambda t: None if t is None else t[:k]  # noqa: E731
        return Draft(list(self.tokens[:k]), cut(self.probs), cut(self.support))


@runtime_checkable
class Drafter(Protocol):
    def propose(self, ctx: DraftContext, k: int) -> Draft:
        """Up to k tokens that should follow ctx.tokens (may return fewer, even none)."""
        ...

    def observe(self, accepted: int, proposed: int) -> None:
        """Told after verification how many of the proposed tokens were accepted."""
        ...
