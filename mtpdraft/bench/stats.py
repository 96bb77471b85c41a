"""Benchmark arithmetic, kept pure (no timing, no model) so it can be tested exactly.

Definitions used throughout:
- tokens/s = decode tokens / decode seconds, summed over prompts (and turns).
  Decode tokens are the tokens emitted by draft/verify cycles; the first token of
  each generation comes from the prefill and is excluded together with the
  prefill time.
- speedup = speculative tokens/s / baseline tokens/s.
- mean accepted tokens (tau) = decode tokens / cycles (counts the target's own token).
- acceptance by position i = drafts accepted at position i / drafts proposed at
  position i, counts summed over prompts before dividing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence


@dataclass
class RunStats:
    """One decoding mode over one or more generations (e.g. all turns of a prompt)."""

    decode_tokens: int = 0
    decode_s: float = 0.0
    tokens: int = 0  # all generated tokens, prefill token included
    cycles: int = 0
    prefill_s: float = 0.0
    generations: int = 0
    proposed_by_pos: list[int] = field(default_factory=list)
    accepted_by_pos: list[int] = field(default_factory=list)

    @classmethod
    def from_stats(cls, s) -> "RunStats":
        """From a `mtpdraft.config.Stats` of one generation."""
        return cls(decode_tokens=s.decode_tokens, decode_s=s.decode_s, tokens=s.tokens, cycles=s.cycles,
                   prefill_s=s.prefill_s, generations=1, proposed_by_pos=list(s.proposed_by_pos),
                   accepted_by_pos=list(s.accepted_by_pos))

    @property
    def tokens_per_s(self) -> float:
        return tokens_per_s(self.decode_tokens, self.decode_s)

    @property
    def mean_accepted_tokens(self) -> float:
        return self.decode_tokens / self.cycles if self.cycles else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return acceptance_rates(self.proposed_by_pos, self.accepted_by_pos)


@dataclass
class PromptRecord:
    """Both modes on one prompt."""

    id: str
    category: str
    plain: RunStats
    spec: RunStats
    identical: bool | None = None  # None: not checked (sampling)
    turns: int = 1


def tokens_per_s(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def speedup(spec_tokens_per_s: float, base_tokens_per_s: float) -> float | None:
    """Speculative over baseline throughput; None when the baseline measured nothing."""
    return spec_tokens_per_s / base_tokens_per_s if base_tokens_per_s > 0 else None


def merge_acceptance(pairs: Iterable[tuple[Sequence[int], Sequence[int]]]) -> tuple[list[int], list[int]]:
    """Sum (proposed_by_pos, accepted_by_pos) count lists of different lengths elementwise."""
    proposed: list[int] = []
    accepted: list[int] = []
    for p, a in pairs:
        if len(p) != len(a):
            raise ValueError(f"proposed and accepted counts differ in length: {len(p)} vs {len(a)}")
        for i, (pi, ai) in enumerate(zip(p, a)):
            if ai > pi:
                raise ValueError(f"position {i + 1}: {ai} accepted out of {pi} proposed")
            if i >= len(proposed):
                proposed.append(0)
                accepted.append(0)
            proposed[i] += pi
            accepted[i] += ai
    return proposed, accepted


def acceptance_rates(proposed: Sequence[int], accepted: Sequence[int]) -> list[float]:
    return [a / p if p else 0.0 for p, a in zip(proposed, accepted)]


def combine(runs: Iterable[RunStats]) -> RunStats:
    """Sum several runs (turns of a conversation, prompts of a category...)."""
    runs = list(runs)
    proposed, accepted = merge_acceptance((r.proposed_by_pos, r.accepted_by_pos) for r in runs)
    return RunStats(decode_tokens=sum(r.decode_tokens for r in runs), decode_s=sum(r.decode_s for r in runs),
                    tokens=sum(r.tokens for r in runs), cycles=sum(r.cycles for r in runs),
                    prefill_s=sum(r.prefill_s for r in runs), generations=sum(r.generations for r in runs),
                    proposed_by_pos=proposed, accepted_by_pos=accepted)


def mode_summary(run: RunStats, speculative: bool = False) -> dict:
    """The `baseline` / `speculative` JSON object. total_tokens / total_s = tokens_per_s."""
    d = {"tokens_per_s": run.tokens_per_s, "total_tokens": run.decode_tokens, "total_s": run.decode_s,
         "generated_tokens": run.tokens, "prefill_s": run.prefill_s, "cycles": run.cycles,
         "generations": run.generations}
    if speculative:
        d.update(mean_accepted_tokens=run.mean_accepted_tokens, acceptance_by_position=run.acceptance_by_position,
                 proposed_by_position=list(run.proposed_by_pos), accepted_by_position=list(run.accepted_by_pos))
    return d


def per_category(records: Sequence[PromptRecord]) -> dict[str, dict]:
    """{category: {speedup, mean_accepted_tokens, num_prompts, baseline/speculative tokens_per_s}}, in first-seen order."""
    groups: dict[str, list[PromptRecord]] = {}
    for r in records:
        groups.setdefault(r.category, []).append(r)
    out = {}
    for cat, rs in groups.items():
        plain, spec = combine(r.plain for r in rs), combine(r.spec for r in rs)
        out[cat] = {"speedup": speedup(spec.tokens_per_s, plain.tokens_per_s),
                    "mean_accepted_tokens": spec.mean_accepted_tokens, "num_prompts": len(rs),
                    "baseline_tokens_per_s": plain.tokens_per_s, "speculative_tokens_per_s": spec.tokens_per_s,
                    "acceptance_by_position": spec.acceptance_by_position,
                    "identical": sum(1 for r in rs if r.identical), "checked": sum(1 for r in rs if r.identical is not None)}
    return out


def identical_outputs(records: Sequence[PromptRecord]) -> dict:
    checked = [r for r in records if r.identical is not None]
    return {"matched": sum(1 for r in checked if r.identical), "total": len(checked),
            "mismatched_ids": [r.id for r in checked if not r.identical]}


def summarize(records: Sequence[PromptRecord]) -> dict:
    """The statistics part of the bench JSON."""
    plain, spec = combine(r.plain for r in records), combine(r.spec for r in records)
    return {"num_prompts": len(records), "baseline": mode_summary(plain),
            "speculative": mode_summary(spec, speculative=True),
            "speedup": speedup(spec.tokens_per_s, plain.tokens_per_s),
            "identical_outputs": identical_outputs(records), "per_category": per_category(records)}
