"""Verification is a pure function: check its rules and its output distribution."""

import pytest
import torch

from mtpdraft.config import SamplingParams
from mtpdraft.decoding.verify import argmax, target_probs, verify


def test_greedy_accepts_longest_agreeing_prefix():
    logits = torch.full((4, 10), -5.0)
    for i, t in enumerate([3, 7, 2, 9]):
        logits[i, t] = 5.0
    sp = SamplingParams()
    assert verify(torch.tensor([3, 7, 2]), None, logits, sp) == (3, 9)  # all accepted + bonus
    assert verify(torch.tensor([3, 1, 2]), None, logits, sp) == (1, 7)  # mismatch at 1
    assert verify(torch.tensor([0, 7, 2]), None, logits, sp) == (0, 3)
    assert verify(torch.empty(0, dtype=torch.long), None, logits[:1], sp) == (0, 3)


def test_argmax_is_torch_argmax():
    """Same index as torch.argmax, ties (first maximum), NaN (counts as the maximum), infinities
    and inference tensors included."""
    g = torch.Generator().manual_seed(0)
    nan, inf = float("nan"), float("inf")
    cases = [torch.randn(7, 262144, generator=g), torch.randint(0, 3, (5, 1000), generator=g).float(),
             torch.tensor([[1.0, nan, 3.0, nan], [2.0, 5.0, 5.0, 1.0], [-inf] * 4, [inf, 1.0, inf, 0.0]]),
             torch.randn(262144, generator=g), torch.randn(4, 9, generator=g)[:, ::2]]
    for x in cases:
        assert torch.equal(argmax(x), x.argmax(-1))
        with torch.inference_mode():
            y = x.clone()
            assert torch.equal(argmax(y), y.argmax(-1))


def test_top_k_top_p_filtering():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = target_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(p, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    p = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    torch.testing.assert_close(p, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    p = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.85))
    torch.testing.assert_close(p, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)


@pytest.mark.parametrize("sp", [SamplingParams(temperature=0.7), SamplingParams(temperature=0.7, top_k=50),
                                SamplingParams(temperature=1.0, top_p=0.9)])
@pytest.mark.parametrize("V", [1000, 262144])  # top-p: a full sort, or the thresholded one
def test_target_probs_of_one_row_is_that_row_of_many(sp, V):
    """verify() builds p row by row as far as the draft is accepted: a row's distribution
    must be the same bits as that row of the whole block's."""
    logits = torch.randn(7, V, generator=torch.Generator().manual_seed(5)) * 4
    whole = target_probs(logits, sp)
    for i in range(logits.shape[0]):
        assert torch.equal(target_probs(logits[i], sp), whole[i])


def _first_token_histogram(sp, q, trials, seed):
    """Emit the first token of a round many times with a draft sampled from q."""
    g = torch.Generator().manual_seed(seed)
    V = q.shape[-1]
    counts = torch.zeros(V)
    for _ in range(trials):
        d = torch.multinomial(q[0], 1, generator=g)
        n, nxt = verify(torch.tensor([int(d), 0]), q, LOGITS, sp, g)
        counts[int(d) if n >= 1 else nxt] += 1
    return counts / trials


LOGITS = torch.log(torch.tensor([[0.30, 0.25, 0.20, 0.10, 0.08, 0.04, 0.02, 0.01]] * 3))


@pytest.mark.parametrize("sp", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7),
                                SamplingParams(temperature=1.0, top_k=4),
                                SamplingParams(temperature=1.3, top_p=0.8)])
@pytest.mark.parametrize("draft", ["dist", "argmax"])
def test_sampling_is_distributed_as_the_target(sp, draft):
    """Fixed seed; tolerance: total variation < 0.02 over 20k trials (3-sigma bound ~0.012)."""
    V = LOGITS.shape[-1]
    if draft == "dist":  # a draft distribution unlike the target's
        q = torch.softmax(torch.tensor([[0.1, 2.0, -1.0, 1.5, 0.0, 0.3, 1.0, -0.5]] * 2), -1)
        got = _first_token_histogram(sp, q, 20000, seed=1)
    else:  # argmax drafter: point mass on its (possibly wrong) guess
        g = torch.Generator().manual_seed(2)
        counts = torch.zeros(V)
        for _ in range(20000):
            n, nxt = verify(torch.tensor([3, 1]), None, LOGITS, sp, g)
            counts[3 if n >= 1 else nxt] += 1
        got = counts / 20000
    want = target_probs(LOGITS[0], sp)
    tv = 0.5 * (got - want).abs().sum().item()
    assert tv < 0.02, (got, want)


def test_q_over_a_support_is_q_over_the_vocabulary():
    """A clustered drafter's q given over its candidate ids (support) makes verify() take the
    same decisions, draw for draw, as the same q written out over the whole vocabulary."""
    g = torch.Generator().manual_seed(7)
    support = torch.tensor([[6, 1, 3, 0, 5], [2, 7, 4, 1, 0]])
    q = torch.softmax(torch.randn(2, 5, generator=g) * 2, -1)
    dense = torch.zeros(2, 8).scatter_(1, support, q)
    for sp in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.8)):
        outs = {}
        for form in ("dense", "support"):
            g1 = torch.Generator().manual_seed(11)
            got = []
            for _ in range(3000):
                d = torch.multinomial(dense, 1, generator=g1)[:, 0]
                args = (dense, LOGITS, sp, g1) if form == "dense" else (q, LOGITS, sp, g1)
                got.append(verify(d, *args, support=None if form == "dense" else support))
            outs[form] = got
        assert outs["dense"] == outs["support"]
        assert {n for n, _ in outs["dense"]} == {0, 1, 2}  # rejections, partial and full acceptance


def test_second_token_conditional_distribution():
    """Given the first draft token was accepted, the next emitted token follows p[1]."""
    sp = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(3)
    counts, hits = torch.zeros(8), 0
    for _ in range(20000):
        n, nxt = verify(torch.tensor([0, 5]), None, LOGITS, sp, g)
        if n >= 1:
            hits += 1
            counts[5 if n == 2 else nxt] += 1
    got = counts / hits
    tv = 0.5 * (got - target_probs(LOGITS[1], sp)).abs().sum().item()
    assert tv < 0.03
