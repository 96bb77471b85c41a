"""Presence/frequency penalties and logit bias on the target's logits.

They change the target distribution itself, so they are applied to the target's
logits before greedy choice or verification: speculative decoding then stays exact
for the penalized distribution (the drafter's own proposals are left alone).
"""

from __future__ import annotations

import torch

from ..config import SamplingParams


def adjust_logits(logits: torch.Tensor, generated: list[int], draft: list[int], sp: SamplingParams) -> torch.Tensor:
    """logits [k+1, V]: row i predicts the token after generated + draft[:i], so row i is
    penalized by the counts of that history. Returns a new tensor (or `logits` itself
    when sp adjusts nothing)."""
    if not sp.adjusts_logits:
        return logits
    out = logits.float().clone()
    if sp.logit_bias:
        ids = torch.tensor(list(sp.logit_bias), dtype=torch.long)
        out[:, ids] += torch.tensor(list(sp.logit_bias.values()), dtype=out.dtype)
    history = generated + draft[:out.shape[0] - 1]
    if (sp.presence_penalty or sp.frequency_penalty) and history:
        ids, inv = torch.unique(torch.tensor(history, dtype=torch.long), return_inverse=True)
        counts = torch.bincount(inv[:len(generated)], minlength=len(ids)).float()
        counts = counts.expand(out.shape[0], -1).clone()  # [k+1, U]
        for i, j in enumerate(inv[len(generated):].tolist()):
            counts[i + 1:, j] += 1
        out[:, ids] -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).float()
    return out
