"""Verification as a pure function of tensors: no model, unit-testable for its distribution.

Notation: p = target distribution, q = draft distribution (None = the drafter
proposed its argmax, i.e. q is a point mass on the draft token).
"""

from __future__ import annotations

import torch

from ..config import SamplingParams


def target_probs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """logits [..., V] -> the sampling distribution [..., V] after temperature, top-k, top-p."""
    logits = logits.float() / sp.temperature
    if sp.top_k and sp.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sp.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sp.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always the first token)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= sp.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def verify(draft: torch.Tensor, draft_probs: torch.Tensor | None, target_logits: torch.Tensor,
           sp: SamplingParams, generator: torch.Generator | None = None) -> tuple[int, int]:
    """Accept a prefix of `draft` and pick the target's next token.

    draft: [k] token ids; draft_probs: [k, V] or None; target_logits: [k+1, V], row i is
    the target's prediction after draft[:i]. Returns (accepted count n, next token): the
    emitted tokens are draft[:n] + [next].
    """
    k = draft.shape[0]
    if sp.greedy:
        best = target_logits.argmax(-1)  # [k+1]
        n = 0
        while n < k and int(draft[n]) == int(best[n]):
            n += 1
        return n, int(best[n])
    p = target_probs(target_logits, sp)  # [k+1, V]
    for i in range(k):
        x = int(draft[i])
        q_x = 1.0 if draft_probs is None else float(draft_probs[i, x])
        u = torch.rand((), generator=generator).item()
        if u * q_x < float(p[i, x]):  # accept with prob min(1, p/q)
            continue
        if draft_probs is None:
            residual = p[i].clone()
            residual[x] = 0.0
        else:
            residual = (p[i] - draft_probs[i].float()).clamp_min(0.0)
        total = residual.sum()
        if total <= 0:  # p == q: rejection had probability 0; fall back to p
            residual, total = p[i], p[i].sum()
        return i, int(torch.multinomial(residual / total, 1, generator=generator))
    return k, int(torch.multinomial(p[k], 1, generator=generator))
