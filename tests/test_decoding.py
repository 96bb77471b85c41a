"""The decoding loop's pieces around verification: stop strings, the context limit,
penalties, tiny temperatures, and the sampler's distribution."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtpdraft
from mtpdraft.config import SamplingParams, SpecParams
from mtpdraft.decoding import generate
from mtpdraft.decoding.penalties import adjust_logits
from mtpdraft.decoding.stops import StopChecker
from mtpdraft.decoding.verify import sample, target_probs, verify
from mtpdraft.drafters import NgramDrafter


class PieceTokenizer:
    """Token i decodes to PIECES[i]; ids in SPECIAL are skipped like special tokens."""

    PIECES = ["a", "b", "ab", "\n", "2", ".", "2.", "é", "<s>", "x" * 40 + "\n" + "y" * 40, "c.\n"]
    SPECIAL = {8}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.PIECES[i] for i in ids if not (skip_special_tokens and i in self.SPECIAL))


def feed(stop, ids, **kw):
    c = StopChecker(SamplingParams(max_new_tokens=len(ids), stop=stop, **kw), set(), PieceTokenizer())
    stable = []
    for t in ids:
        done = c.add(t)
        stable.append(c.stable_text())
        if done:
            break
    return c, stable


def test_stop_inside_a_long_token():
    # the stop sits 41 characters before the end of the only token: a window counted
    # back from the end of the text (longest stop + 16) never saw it
    c, _ = feed(("\n",), [9])
    assert c.reason == "stop" and c.text() == "x" * 40


def test_stable_text_holds_back_a_possible_stop():
    c, stable = feed(("2.",), [0, 3, 4, 1])  # "a\n2b": "2" could have begun "2."
    assert stable == ["a", "a\n", "a\n", "a\n2b"] and c.reason == "length"
    c, stable = feed(("2.",), [0, 3, 4, 5])
    assert c.reason == "stop" and c.text() == "a\n" and stable[-1] == "a\n"


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, len(PieceTokenizer.PIECES) - 1), min_size=1, max_size=12),
       stop=st.lists(st.sampled_from(["\n", "2.", "ab", "b\n", "é2", ".\n2", "yyy"]), max_size=3))
def test_stream_is_a_prefix_of_the_final_text(ids, stop):
    """What a stream may send after each token is a prefix of the final text; the final
    text is the decoded text cut before the first stop string."""
    c, stable = feed(tuple(stop), ids)
    final = c.text()
    assert all(final.startswith(s) for s in stable)
    assert stable[-1] == final
    full = PieceTokenizer().decode(c.ids, skip_special_tokens=True)
    hits = [full.find(s) for s in stop if s in full]
    assert final == (full[:min(hits)] if hits else full)
    assert (c.reason == "stop") == bool(hits)


def test_context_limit_ends_with_length(tiny_dirs):
    """Reaching max_len finishes with reason "length" (it raised "context full")."""
    model, tok = mtpdraft.load(str(tiny_dirs["gemma3_text"]), "fp32")
    prompt = tok("abc abc abc").input_ids
    sp = SamplingParams(max_new_tokens=50, ignore_eos=True)
    for drafter in (None, NgramDrafter()):
        stopper = StopChecker(sp, set(), tok)
        out = list(generate(model, prompt, sp, drafter=drafter, spec=SpecParams(4), stopper=stopper, max_len=20))
        assert len(prompt) + len(out) == 20 and stopper.reason == "length"


def test_cache_holds_the_request_not_the_context(tiny_dirs, monkeypatch):
    """generate() sizes its cache to prompt + token budget (zeroing a whole context per
    call cost tens of ms); drafting right up to the budget still fits, and the output
    is the same as with the context-sized cache."""
    model, tok = mtpdraft.load(str(tiny_dirs["gemma3_text"]), "fp32")
    prompt = tok("abc abc abc abc").input_ids
    sizes = []
    new_cache = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda *a, **kw: sizes.append(a[1]) or new_cache(*a, **kw))
    for n in (1, 2, 9):
        sp = SamplingParams(max_new_tokens=n, ignore_eos=True)
        outs = [list(generate(model, prompt, sp, drafter=d, spec=SpecParams(8), max_len=ml))
                for d in (None, NgramDrafter()) for ml in (None, len(prompt) + n)]
        assert all(o == outs[0] for o in outs) and len(outs[0]) == n
        assert max(sizes[-4:]) <= len(prompt) + n + 1
    assert max(sizes) < 8192


def _rows(model, tok, prompts, n, drafter=None):
    from mtpdraft.decoding.step import Row

    sp = SamplingParams(max_new_tokens=n, ignore_eos=True)
    return [Row(tok(p).input_ids, sp, StopChecker(sp, set(), tok), 64, drafter and drafter(), 4) for p in prompts]


def test_batch_admit_that_fails_leaves_no_row(tiny_dirs):
    """A row whose first token cannot be committed never joins the batch."""
    from mtpdraft.decoding.step import Batch

    model, tok = mtpdraft.load(str(tiny_dirs["gemma3_text"]), "fp32")
    batch = Batch(model, 2, 64, max_draft=4)
    bad, good = _rows(model, tok, ["abc abc", "hello hello"], 12)

    def broken(token):
        raise RuntimeError("injected stop-check failure")

    bad.stopper.add = broken
    with pytest.raises(RuntimeError, match="injected"):
        batch.admit(bad)
    assert batch.rows == [] and batch.cache.lengths == (0, 0)
    out = batch.admit(good).tokens
    while not good.done:
        out += batch.step().rows[0].tokens
    assert out == list(generate(model, good.prompt, SamplingParams(max_new_tokens=12, ignore_eos=True)))


def test_batched_forward_failing_in_the_head_is_retried_from_the_start(tiny_dirs, monkeypatch):
    """The forward advances the cache before the head: a retry row by row must start from
    each row's length before the failed attempt, and then gives the single-row tokens."""
    from mtpdraft.decoding.step import Batch

    model, tok = mtpdraft.load(str(tiny_dirs["gemma3_text"]), "fp32")
    prompts = ["abc abc abc", "the cat sat on the mat"]
    want = [list(generate(model, tok(p).input_ids, SamplingParams(max_new_tokens=16, ignore_eos=True),
                          drafter=NgramDrafter(), spec=SpecParams(4))) for p in prompts]
    logits, calls = model.logits, []

    def flaky(h):
        calls.append(h.shape[0])
        if h.shape[0] > 1 and len(calls) % 3 == 0:  # every third batched head call fails
            raise RuntimeError("injected head failure")
        return logits(h)

    monkeypatch.setattr(model, "logits", flaky)
    batch = Batch(model, 2, 64, max_draft=4)
    rows = _rows(model, tok, prompts, 16, NgramDrafter)
    got = [batch.admit(r).tokens for r in rows]
    while batch.rows:
        for e in batch.step().rows:
            assert e.error is None
            got[rows.index(e.row)] += e.tokens
        for r in [r for r in batch.rows if r.done]:
            batch.release(r)
    assert got == want and any(c > 1 for c in calls)


def test_adjust_logits_counts_each_rows_history():
    V = 6
    sp = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={4: 2.0})
    got = adjust_logits(torch.zeros(3, V), [1, 1, 2], [2, 3], sp)
    counts = torch.tensor([[0, 2, 1, 0, 0, 0], [0, 2, 2, 0, 0, 0], [0, 2, 2, 1, 0, 0]], dtype=torch.float)
    want = -0.25 * counts - 0.5 * (counts > 0).float()
    want[:, 4] += 2.0
    torch.testing.assert_close(got, want)
    x = torch.randn(2, V)
    assert adjust_logits(x, [1], [2], SamplingParams()) is x  # nothing to adjust: untouched


def naive_penalized_greedy(model, prompt, sp, n):
    """Reference: full forward over the whole sequence each step, penalties by hand."""
    ids = list(prompt)
    for _ in range(n):
        cache = model.new_cache(1, 256)
        logits = model(torch.tensor([ids]), cache, logits="last").logits[0, -1].clone()
        for t in set(ids[len(prompt):]):
            c = ids[len(prompt):].count(t)
            logits[t] -= sp.frequency_penalty * c + sp.presence_penalty
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_penalties_are_exact_with_a_drafter(tiny_dirs):
    model, tok = mtpdraft.load(str(tiny_dirs["llama"]), "fp32")
    prompt = tok("abc abc abc abc").input_ids
    sp = SamplingParams(max_new_tokens=24, ignore_eos=True, presence_penalty=0.7, frequency_penalty=0.4)
    plain = list(generate(model, prompt, sp))
    spec = list(generate(model, prompt, sp, drafter=NgramDrafter(), spec=SpecParams(4)))
    assert plain == spec == naive_penalized_greedy(model, prompt, sp, 24)
    assert plain != list(generate(model, prompt, SamplingParams(max_new_tokens=24, ignore_eos=True)))


def test_tiny_temperature_is_greedy():
    logits = torch.randn(3, 50) * 30
    for t in (1e-40, 1e-300, 5e-6):
        sp = SamplingParams(temperature=t)
        assert sp.greedy
        assert verify(torch.tensor([int(logits[0].argmax()), 1]), None, logits, sp) == \
            verify(torch.tensor([int(logits[0].argmax()), 1]), None, logits, SamplingParams())
    with pytest.raises(ValueError):
        SamplingParams(temperature=float("inf"))


def reference_target_probs(logits, sp):
    """The definition: full-vocabulary sort for top-p."""
    logits = logits.float() / sp.temperature
    if sp.top_k and sp.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sp.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sp.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= sp.top_p
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@pytest.mark.parametrize("scale", [8.0, 3.0, 0.3, 0.0])  # peaked .. flat (flat needs the full sort)
@pytest.mark.parametrize("sp", [SamplingParams(temperature=0.7, top_p=0.95), SamplingParams(temperature=1.0, top_p=0.5),
                                SamplingParams(temperature=1.3, top_p=0.99, top_k=300),
                                SamplingParams(temperature=0.7)])
def test_top_p_is_the_full_sort_nucleus(scale, sp):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40000, generator=g) * scale
    got, want = target_probs(logits, sp), reference_target_probs(logits, sp)
    assert torch.equal(got > 0, want > 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


def test_sampler_distribution():
    """sample() draws from p (unnormalized, mass in several CDF blocks, zeros never drawn):
    20k draws, total variation < 0.025 (3-sigma ~0.012 for 10 outcomes)."""
    V = 3000
    p = torch.zeros(V)
    support = [0, 5, 1023, 1024, 1500, 2047, 2048, 2500, 2998, 2999]
    p[support] = torch.tensor([3.0, 1.0, 0.5, 2.0, 0.25, 1.0, 4.0, 0.75, 0.5, 2.0])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(V)
    for _ in range(20000):
        counts[sample(p, g)] += 1
    assert counts[p == 0].sum() == 0
    tv = 0.5 * (counts / counts.sum() - p / p.sum()).abs().sum().item()
    assert tv < 0.025, tv
