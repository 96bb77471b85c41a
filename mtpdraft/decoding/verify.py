"""Verification as a pure function of tensors: no model, unit-testable for its distribution.

Notation: p = target distribution, q = draft distribution (None = the drafter
proposed its argmax, i.e. q is a point mass on the draft token).
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import SamplingParams

# Top-p over a large vocabulary sorts only the candidates p >= threshold, trying each
# threshold in turn (then a full sort): the prefix they give is exactly a full sort's,
# without sorting 262k entries (~20 ms on two cores) per row.
_NUCLEUS_THRESHOLDS = (1e-4, 1e-6)
_BLOCK = 1024  # sample(): CDF block size; also the vocabulary size up to which top-p sorts all


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [..., V] -> [...] indices: torch.argmax's result (the first maximum; NaN
    counts as the maximum), computed by numpy, whose vectorized scan of a 262k-entry
    fp32 row takes ~0.03 ms where torch 2.13's CPU argmax takes ~0.4 ms (a few % of a
    decode step, per verified position)."""
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.requires_grad:
        return logits.argmax(-1)
    return torch.from_numpy(np.asarray(np.argmax(logits.contiguous().numpy(), axis=-1)))


def target_probs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """logits [..., V] -> the sampling distribution [..., V] after temperature, top-k, top-p."""
    logits = logits.float() / sp.temperature
    if sp.top_k and sp.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sp.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sp.top_p < 1.0:
        if probs.shape[-1] <= _BLOCK:
            sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
            probs = torch.zeros_like(probs).scatter_(-1, idx, _nucleus(sorted_p, sp.top_p))
            probs = probs / probs.sum(-1, keepdim=True)
        else:
            for row in probs.view(-1, probs.shape[-1]):
                _top_p_(row, sp.top_p)
    return probs


def _nucleus(sorted_p: torch.Tensor, top_p: float, cum: torch.Tensor | None = None) -> torch.Tensor:
    """Descending probabilities (and their cumsum) -> the smallest prefix whose mass
    reaches top_p (always the first token) kept, the rest zeroed."""
    cum = sorted_p.cumsum(-1) if cum is None else cum
    return sorted_p.masked_fill((cum - sorted_p) >= top_p, 0.0)


def _top_p_(p: torch.Tensor, top_p: float) -> None:
    """_nucleus of one row p [V], renormalized, in place."""
    for thr in _NUCLEUS_THRESHOLDS + (None,):
        idx = torch.arange(p.shape[0]) if thr is None else (p >= thr).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        sorted_p, order = torch.sort(p[idx], descending=True)
        cum = sorted_p.cumsum(-1)
        # every other token is below the candidates: once their cumsum (value for value a
        # full sort's) reaches top_p, the prefix is complete
        if thr is not None and float(cum[-1]) < top_p:
            continue
        keep = _nucleus(sorted_p, top_p, cum)
        p.zero_()
        p[idx[order]] = keep
        p.div_(keep.sum())
        return


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One draw from probs [V] (need not be normalized) by inverting its CDF in fp64;
    over a large vocabulary first across blocks of _BLOCK tokens, then inside one.

    Same distribution as torch.multinomial(probs, 1), which draws V exponentials
    (~5 ms per token over a 262k vocabulary); this draws one uniform.
    """
    probs = probs.reshape(-1)
    u = torch.rand((), dtype=torch.float64, generator=generator)  # a fraction of the total mass
    V = probs.shape[0]
    if V <= _BLOCK:
        return _invert_cdf(probs, u)
    n = V - V % _BLOCK
    sums = probs[:n].view(-1, _BLOCK).sum(1, dtype=torch.float64)
    if n < V:
        sums = torch.cat([sums, probs[n:].sum(dtype=torch.float64).view(1)])
    cdf = sums.cumsum(0)
    u = u * cdf[-1]
    b = min(int(torch.searchsorted(cdf, u, right=True)), cdf.shape[0] - 1)
    while float(sums[b]) <= 0:  # u rounded onto a block boundary
        b -= 1
    u = (u - (cdf[b - 1] if b else 0.0)) / sums[b]
    return b * _BLOCK + _invert_cdf(probs[b * _BLOCK:(b + 1) * _BLOCK], u)


def _invert_cdf(p: torch.Tensor, u: torch.Tensor) -> int:
    """The token of p [n] whose CDF interval holds the fraction u of p's total."""
    cdf = p.double().cumsum(0)
    i = int(torch.searchsorted(cdf, u * cdf[-1], right=True))
    if i >= p.shape[0]:  # rounding put u past the total: the last token with mass
        i = int(p.nonzero()[-1])
    return i


def verify(draft: torch.Tensor, draft_probs: torch.Tensor | None, target_logits: torch.Tensor,
           sp: SamplingParams, generator: torch.Generator | None = None,
           support: torch.Tensor | None = None) -> tuple[int, int]:
    """Accept a prefix of `draft` and pick the target's next token.

    draft: [k] token ids; draft_probs: q, [k, V], or [k, C] over the distinct token ids
    `support` [k, C] (0 elsewhere), or None (each draft token was an argmax: q a point
    mass); target_logits: [k+1, V], row i is the target's prediction after draft[:i].
    Returns (accepted count n, next token): the emitted tokens are draft[:n] + [next].
    """
    k = draft.shape[0]
    if sp.greedy:
        best = argmax(target_logits).tolist()  # [k+1]
        n = 0
        d = draft.tolist()
        while n < k and d[n] == best[n]:
            n += 1
        return n, best[n]
    # p row by row, only as far as the draft is accepted: each row's distribution over a
    # large vocabulary costs ~0.25 ms, and most cycles stop well before row k
    for i in range(k):
        p = target_probs(target_logits[i], sp)  # [V]
        x = int(draft[i])
        if draft_probs is None:
            q_x = 1.0
        elif support is None:
            q_x = float(draft_probs[i, x])
        else:
            at = (support[i] == x).nonzero()
            q_x = float(draft_probs[i, at[0, 0]]) if at.numel() else 0.0
        u = torch.rand((), generator=generator).item()
        if u * q_x < float(p[x]):  # accept with prob min(1, p/q)
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[x] = 0.0
        elif support is None:
            residual = (p - draft_probs[i].float()).clamp_min(0.0)
        else:  # the same values as the dense form: p itself off the support
            residual = p.clone()
            residual[support[i]] = (p[support[i]] - draft_probs[i].float()).clamp_min(0.0)
        if residual.sum() <= 0:  # p == q: rejection had probability 0; fall back to p
            residual = p
        return i, sample(residual, generator)
    return k, sample(target_probs(target_logits[k], sp), generator)
