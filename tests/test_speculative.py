"""Speculative greedy == plain greedy, on tiny random targets with random drafters."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mtpdraft
from mtpdraft.config import SamplingParams, SpecParams, Stats
from mtpdraft.decoding import generate
from mtpdraft.drafters import Draft, DraftContext, MTPConfig, MTPDrafter, MTPDraftSource, NgramDrafter
from mtpdraft.drafters.gemma4_assistant import Gemma4AssistantDrafter
from mtpdraft.models import gemma4
from mtpdraft.testing import TINY_CONFIGS

FAMILIES = list(TINY_CONFIGS)
_cache = {}


def model_and_tok(tiny_dirs, fam):
    if fam not in _cache:
        _cache[fam] = mtpdraft.load(str(tiny_dirs[fam]), "fp32")
    return _cache[fam]


def random_mtp(model, seed, clustered):
    kw = dict(hidden_size=32, intermediate_size=64, num_attention_heads=model.args.num_key_value_heads * 2,
              layer_types=["sliding_attention", "full_attention"],
              use_ordered_embeddings=clustered, num_centroids=16, centroid_intermediate_top_k=4)
    if isinstance(model, gemma4.Model):
        return MTPDraftSource(random_gemma4_assistant(model, seed, **kw))
    return MTPDraftSource(MTPDrafter.random(MTPConfig.for_target(model, **kw), seed=seed, std=0.3))


def random_gemma4_assistant(model, seed, **kw):
    """A random gemma4_assistant-style drafter: its full-attention queries take the target's
    full-layer head_dim (the generic MTPDrafter's single head_dim cannot read those keys)."""
    a = model.args
    cfg = MTPConfig(backbone_hidden_size=a.hidden_size, vocab_size=a.vocab_size, head_dim=a.head_dim,
                    num_key_value_heads=1, **kw)
    d = Gemma4AssistantDrafter(cfg, a)
    g = torch.Generator().manual_seed(seed)
    for _, p in d.named_parameters():  # Gemma 4 norms scale by their weight: keep them near 1
        p.data = 1 + 0.1 * torch.randn(p.shape, generator=g) if p.ndim == 1 else torch.randn(p.shape, generator=g) * 0.3
    d.check_target(model)
    return d.eval()


class ReplayDrafter:
    """A perfect drafter: proposes the target's own continuation."""

    def __init__(self, prompt_len, continuation):
        self.prompt_len, self.cont = prompt_len, continuation

    def propose(self, ctx, k):
        done = len(ctx.tokens) - self.prompt_len
        return Draft(self.cont[done:done + k])

    def observe(self, accepted, proposed):
        pass


class NoisyDrafter:
    """Right sometimes, wrong sometimes: exercises partial acceptance and rollback."""

    def __init__(self, prompt_len, continuation, seed):
        self.prompt_len, self.cont, self.g = prompt_len, continuation, torch.Generator().manual_seed(seed)

    def propose(self, ctx, k):
        done = len(ctx.tokens) - self.prompt_len
        out = list(self.cont[done:done + k])
        for i in range(len(out)):
            if torch.rand((), generator=self.g) < 0.3:
                out[i] = int(torch.randint(4, 512, (), generator=self.g))
        return Draft(out)

    def observe(self, accepted, proposed):
        pass


def run(model, tok, prompt, sp, drafter=None, k=4, adaptive=False):
    stats = Stats()
    out = list(generate(model, prompt, sp, drafter=drafter, spec=SpecParams(draft_len=k, adaptive=adaptive),
                        tokenizer=tok, stats=stats))
    return out, stats


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fam=st.sampled_from(FAMILIES),
       prompt=st.lists(st.integers(4, 511), min_size=1, max_size=40),
       k=st.integers(1, 8), max_new=st.integers(1, 40), adaptive=st.booleans(),
       kind=st.sampled_from(["ngram", "mtp", "mtp_dense", "noisy"]), seed=st.integers(0, 5),
       stop_at=st.one_of(st.none(), st.integers(0, 30)))
def test_speculative_greedy_equals_plain(tiny_dirs, fam, prompt, k, max_new, adaptive, kind, seed, stop_at):
    model, tok = model_and_tok(tiny_dirs, fam)
    plain_full, _ = run(model, tok, prompt, SamplingParams(max_new_tokens=max_new, ignore_eos=True))
    stop = ()
    if stop_at is not None and stop_at < len(plain_full):
        # a stop string that plain decoding hits mid-way: the decoded text of one generated token
        piece = tok.decode([plain_full[stop_at]])
        if piece.strip() and "\ufffd" not in piece:
            stop = (piece,)
    sp = SamplingParams(max_new_tokens=max_new, ignore_eos=True, stop=stop)
    plain, _ = run(model, tok, prompt, sp)
    drafter = {"ngram": lambda: NgramDrafter(),
               "mtp": lambda: random_mtp(model, seed, clustered=True),
               "mtp_dense": lambda: random_mtp(model, seed, clustered=False),
               "noisy": lambda: NoisyDrafter(len(prompt), plain_full, seed)}[kind]()
    spec, _ = run(model, tok, prompt, sp, drafter, k, adaptive)
    assert spec == plain


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("k", [1, 3, 6])
def test_perfect_drafter_reaches_k_plus_one(tiny_dirs, fam, k):
    model, tok = model_and_tok(tiny_dirs, fam)
    prompt = tok("the perfect drafter").input_ids
    sp = SamplingParams(max_new_tokens=1 + (k + 1) * 6, ignore_eos=True)
    plain, _ = run(model, tok, prompt, sp)
    spec, stats = run(model, tok, prompt, sp, ReplayDrafter(len(prompt), plain), k)
    assert spec == plain
    assert stats.cycles == 6 and stats.mean_accepted_tokens == k + 1
    assert stats.acceptance_by_position == [1.0] * k


def test_eos_inside_an_accepted_draft(tiny_dirs):
    """EOS in the middle of a fully accepted draft ends generation right there."""
    model, tok = model_and_tok(tiny_dirs, "llama")
    prompt = tok("stop early").input_ids
    plain_full, _ = run(model, tok, prompt, SamplingParams(max_new_tokens=20, ignore_eos=True))
    eos = plain_full[5]
    first = plain_full.index(eos)
    model.args.eos_token_id = eos
    try:
        sp = SamplingParams(max_new_tokens=20)
        plain, _ = run(model, tok, prompt, sp)
        spec, _ = run(model, tok, prompt, sp, ReplayDrafter(len(prompt), plain_full), 8)
    finally:
        del model.args.eos_token_id
    assert plain == spec == plain_full[:first + 1]


def test_sampling_reproducible_with_seed(tiny_dirs):
    model, tok = model_and_tok(tiny_dirs, "gemma3_text")
    prompt = tok("sample me").input_ids
    sp = SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    a, _ = run(model, tok, prompt, sp, NgramDrafter())
    b, _ = run(model, tok, prompt, sp, NgramDrafter())
    assert a == b


@pytest.mark.parametrize("clustered", [False, True])
def test_speculative_sampling_matches_target_marginal(tiny_dirs, clustered):
    """The second generated token's distribution with a drafter (which samples its drafts
    from its own q) matches plain sampling (both estimated over 400 seeds; tolerance
    TV < 0.15 for a vocab restricted by top_k=4)."""
    model, tok = model_and_tok(tiny_dirs, "llama")
    prompt = tok("dist").input_ids
    hist = {}
    for mode in ("plain", "spec"):
        counts = {}
        for s in range(400):
            sp = SamplingParams(max_new_tokens=2, temperature=1.0, top_k=4, seed=s, ignore_eos=True)
            d = random_mtp(model, 0, clustered=clustered) if mode == "spec" else None
            out, _ = run(model, tok, prompt, sp, d, 2)
            counts[tuple(out)] = counts.get(tuple(out), 0) + 1
        hist[mode] = counts
    keys = set(hist["plain"]) | set(hist["spec"])
    tv = 0.5 * sum(abs(hist["plain"].get(k, 0) - hist["spec"].get(k, 0)) for k in keys) / 400
    assert tv < 0.15, tv


@pytest.mark.parametrize("clustered", [False, True])
def test_mtp_drafts_are_sampled_from_their_own_distribution(tiny_dirs, clustered):
    """At temperature > 0 the MTP drafter draws its tokens from q (its logits at the request's
    temperature / top-k) and returns q (over a clustered head's candidates, or the whole
    vocabulary); greedy requests get argmaxes."""
    model, tok = model_and_tok(tiny_dirs, "llama")
    src = random_mtp(model, 0, clustered)
    prompt = tok("draft me").input_ids
    cache = model.new_cache(1, 64)
    hidden = model.prefill(torch.tensor([prompt]), cache).hidden[0, -1]

    def ctx(sp=None, seed=0):
        return DraftContext(prompt + [7], hidden, model, cache, 0, sp, torch.Generator().manual_seed(seed))

    assert src.propose(ctx(), 3).probs is None
    sp = SamplingParams(temperature=1.3, top_k=12)
    d = src.propose(ctx(sp), 3)
    V = model.args.vocab_size
    # a clustered head returns q over its candidates only (support), else over the vocabulary
    assert (d.support is not None) == clustered
    if clustered:
        assert d.support.shape == d.probs.shape and d.support.shape[0] == 3 and d.support.shape[1] < V
        assert all(len(set(row.tolist())) == row.numel() for row in d.support)  # distinct ids
    q = d.dense_probs(V)
    assert q.shape == (3, V)
    torch.testing.assert_close(q.sum(-1), torch.ones(3))
    assert all(float(q[i, t]) > 0 for i, t in enumerate(d.tokens))
    assert ((q > 0).sum(-1) <= 12).all()
    # the first drafted token follows q[0] (the same for every seed: same context)
    n = 600
    counts = torch.bincount(torch.tensor([src.propose(ctx(sp, s), 1).tokens[0] for s in range(n)]), minlength=V)
    assert 0.5 * float((counts / n - q[0]).abs().sum()) < 0.1


def drafting_context(model, d, prompt=tuple(range(5, 45))):
    """A prefilled prompt and what a drafting step reads: (prompt, cache, the last hidden state,
    d's sources, their K and V caches, the last position as positions)."""
    prompt = list(prompt)
    cache = model.new_cache(1, 64)
    hidden = model.prefill(torch.tensor([prompt]), cache).hidden[0, -1]
    srcs = d.sources(model, cache)
    return prompt, cache, hidden, srcs, ([lc.k for _, lc in srcs], [lc.v for _, lc in srcs]), \
        torch.tensor([[len(prompt) - 1]])


@pytest.mark.parametrize("fam", ["gemma3_text", "llama"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "q8_0"])
@pytest.mark.parametrize("tie", [False, True])
def test_native_drafting_step_is_the_python_step_bit_for_bit(tiny_dirs, tmp_path, monkeypatch, fam, dtype, tie):
    """MTPDrafter.native_step (the whole step in one native call) returns the same ids, logits
    and h' bits as step() over chained steps, proposes the same greedy drafts (a gate stopping
    one mid-way included), and is rebuilt when a weight changes in place (training) or moves,
    or the top-k it searches changes."""
    import mtpdraft.registry

    monkeypatch.setattr(mtpdraft.registry, "cache_root", lambda: tmp_path / "cache")  # q8_0 cache
    model, tok = mtpdraft.load(str(tiny_dirs[fam]), dtype)
    cfg = MTPConfig.for_target(model, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                               layer_types=["sliding_attention", "full_attention"], num_centroids=16,
                               centroid_intermediate_top_k=4, tie_output_to_target=tie,
                               input_embed_scale=4.0)  # both paths must apply it (times the family's own)
    d = MTPDrafter.random(cfg, seed=1, std=0.3).to_dtype(model.dtype)
    d.masked_embedding.token_ordering.copy_(torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(2)))
    native = d.native_step(model)
    assert native is not None
    prompt, cache, hidden, srcs, kv, positions = drafting_context(model, d)
    conf = []  # each greedy step's probability of its choice
    with torch.inference_mode():
        t, h = 7, hidden[None].float()
        for _ in range(6):
            want = d.step(model, torch.tensor([t]), h, positions, srcs)
            got = native.step(t, h, positions, *kv)
            assert all(torch.equal(a, b) for a, b in zip(want, got))
            j = int(want[1][0].argmax())
            conf.append(float(torch.softmax(want[1][0], -1)[j]))
            t, h = int(want[0][0, j]), want[2]

    ctx = DraftContext(prompt + [7], hidden, model, cache)
    stop = 1 + min(range(1, 5), key=lambda i: conf[i])  # a gate just above this step's confidence ends the draft there
    for gate, length in ((0.0, 6), (conf[stop - 1] * (1 + 1e-6), stop - 1)):
        src = MTPDraftSource(d, min_confidence=gate)
        drafted = src.propose(ctx, 6).tokens
        assert len(drafted) == length
        with monkeypatch.context() as m:
            m.setattr(d, "native_step", lambda target: None)  # the Python step
            assert src.propose(ctx, 6).tokens == drafted
    with torch.no_grad():  # an optimizer step changes a weight in place: the native step follows
        d.pre_projection.weight.mul_(-1)
    assert d.native_step(model) is not native
    with torch.inference_mode():
        want = d.step(model, torch.tensor([7]), hidden[None].float(), positions, srcs)
        assert all(torch.equal(a, b) for a, b in zip(want, d.native_step(model).step(7, hidden[None].float(),
                                                                                       positions, *kv)))
    built = d.native_step(model)
    d.pre_projection.weight.data = d.pre_projection.weight.data.clone()  # a weight's data moves (a dtype change does)
    assert d.native_step(model) is not built
    built = d.native_step(model)
    assert d.native_step(model) is built  # nothing changed: the step is kept
    e = model.model.embed_tokens
    if model.embed_table is e.weight:  # reloaded target weights are new tensors: the step follows
        e.weight = torch.nn.Parameter(e.weight.detach().clone(), requires_grad=False)
        assert d.native_step(model) is not built
        built = d.native_step(model)
    d.config.centroid_intermediate_top_k = 2  # a setting changes (the trainer's top-k search): so does the step
    assert d.native_step(model) is not built
    with torch.inference_mode():
        want = d.step(model, torch.tensor([7]), hidden[None].float(), positions, srcs)
        assert want[0].shape[1] == 2 * cfg.vocab_size // cfg.num_centroids
        assert all(torch.equal(a, b) for a, b in zip(want, d.native_step(model).step(7, hidden[None].float(),
                                                                                       positions, *kv)))


@pytest.mark.parametrize("fam", ["gemma3_text", "llama"])
@pytest.mark.parametrize("tie", [False, True])
def test_quantized_drafter(tiny_dirs, tmp_path, monkeypatch, fam, tie):
    """A drafter loaded for a quantized target drafts with Q8_0 matrices (for a dense target it
    keeps its dtype): its native step gives the Python step's bits, its logits stay near the
    dense drafter's, it cannot be saved, and speculative greedy output is still plain greedy's."""
    import mtpdraft.registry
    from mtpdraft import kernels
    from mtpdraft.drafters import make_drafter

    monkeypatch.setattr(mtpdraft.registry, "cache_root", lambda: tmp_path / "cache")  # q8_0 cache
    dense_target = mtpdraft.load(str(tiny_dirs[fam]), "bf16")[0]
    cfg = MTPConfig.for_target(dense_target, hidden_size=32, intermediate_size=64,
                               num_attention_heads=4, layer_types=["sliding_attention", "full_attention"],
                               num_centroids=16, centroid_intermediate_top_k=4, tie_output_to_target=tie)
    MTPDrafter.random(cfg, seed=5, std=0.3).save(tmp_path / "d")
    assert not make_drafter(str(tmp_path / "d"), dense_target).drafter.quantized
    model, tok = mtpdraft.load(str(tiny_dirs[fam]), "q8_0")
    assert model.quantized
    src = make_drafter(str(tmp_path / "d"), model)
    q, dense = src.drafter, MTPDrafter.load(tmp_path / "d", model.dtype)
    assert q.quantized and not dense.quantized
    assert all(isinstance(q.get_submodule(n).qweight, kernels.QWeight) and q.get_submodule(n).weight.numel() == 0
               for n in ("pre_projection", "post_projection", "masked_embedding.centroids", "model.layers.1.mlp.down_proj"))
    prompt, cache, hidden, srcs, kv, positions = drafting_context(model, q)
    native = q.native_step(model)
    assert native is not None
    with torch.inference_mode():
        t, h = 7, hidden[None].float()
        for _ in range(4):
            want = q.step(model, torch.tensor([t]), h, positions, srcs)
            assert all(torch.equal(a, b) for a, b in zip(want, native.step(t, h, positions, *kv)))
            ids, logits, h_dense = dense.step(model, torch.tensor([t]), h, positions, srcs)
            if torch.equal(ids, want[0]):  # the same clusters chosen: near-equal scores and state
                torch.testing.assert_close(want[1], logits, atol=0.05 * float(logits.abs().max()), rtol=0)
            torch.testing.assert_close(want[2], h_dense, atol=0.05 * float(h_dense.abs().max()), rtol=0)
            t, h = int(want[0][0, int(want[1][0].argmax())]), want[2]
    with pytest.raises(ValueError, match="quantized drafter"):
        q.save(tmp_path / "again")
    ids = tok("the quick brown fox").input_ids
    sp = SamplingParams(max_new_tokens=24)
    plain = list(generate(model, ids, sp))
    assert list(generate(model, ids, sp, drafter=src, spec=SpecParams(draft_len=3))) == plain


def test_native_drafting_step_with_inference_tensor_weights(tiny_dirs, tmp_path):
    """A drafter loaded inside inference mode (weights without version counters) drafts
    natively, the same tokens as the Python step; a token outside the vocabulary is refused."""
    model, _ = mtpdraft.load(str(tiny_dirs["gemma3_text"]), "bf16")
    cfg = MTPConfig.for_target(model, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                               num_centroids=16, centroid_intermediate_top_k=4, tie_output_to_target=True)
    MTPDrafter.random(cfg, seed=3, std=0.3).save(tmp_path / "d")
    with torch.inference_mode():
        d = MTPDrafter.load(tmp_path / "d", model.dtype)
    assert d.pre_projection.weight.is_inference()
    prompt = list(range(5, 30))
    cache = model.new_cache(1, 64)
    hidden = model.prefill(torch.tensor([prompt]), cache).hidden[0, -1]
    ctx = DraftContext(prompt + [7], hidden, model, cache)
    src = MTPDraftSource(d)
    drafted = src.propose(ctx, 5).tokens
    assert d.native_step(model) is not None and len(drafted) == 5
    d.native_step = lambda target: None
    assert src.propose(ctx, 5).tokens == drafted
    del d.native_step
    srcs = d.sources(model, cache)
    with pytest.raises((IndexError, RuntimeError)):
        d.native_step(model).step(model.args.vocab_size, hidden[None].float(), torch.tensor([[len(prompt)]]),
                                  [lc.k for _, lc in srcs], [lc.v for _, lc in srcs])


def test_native_drafting_step_only_where_it_is_the_same_step(tiny_dirs):
    """Subclasses with their own layers (the Gemma 4 assistant) and dense heads keep step()."""
    model, _ = model_and_tok(tiny_dirs, "gemma3_text")
    assert random_mtp(model, 0, clustered=False).drafter.native_step(model) is None
    assert random_mtp(model, 0, clustered=True).drafter.native_step(model) is not None
    g4, _ = model_and_tok(tiny_dirs, "gemma4_text")
    assert random_mtp(g4, 0, clustered=True).drafter.native_step(g4) is None


def test_make_drafter_specs(tiny_dirs, tmp_path):
    from mtpdraft.drafters import make_drafter
    from mtpdraft.drafters.combined import CombinedDrafter

    model, _ = model_and_tok(tiny_dirs, "gemma3_text")
    assert make_drafter("none", model) is None
    assert isinstance(make_drafter("ngram", model), NgramDrafter)
    # no drafter ships for this model: auto is prompt lookup
    assert isinstance(make_drafter("auto", model, "no-such-bundled-model"), NgramDrafter)
    # a drafter directory loads as an MTP drafter; auto for a model that ships one is MTP + lookup
    random_mtp(model, 0, True).drafter.save(tmp_path / "d")
    assert isinstance(make_drafter(str(tmp_path / "d"), model), MTPDraftSource)
    import mtpdraft.drafters as drafters

    old = drafters.SHIPPED_DIR
    try:
        drafters.SHIPPED_DIR = tmp_path
        auto = make_drafter("auto", model, "d")
        (tmp_path / "d" / "auto.json").write_text('{"min_confidence": 0.5, "min_match": 3}')
        gated = make_drafter("auto", model, "d")
        (tmp_path / "d" / "auto.json").write_text('{"drafter": "mtp", "min_confidence": 0.4}')
        alone = make_drafter("auto", model, "d")
        (tmp_path / "d" / "auto.json").write_text('{"drafter": "eagle"}')
        with pytest.raises(ValueError, match="unknown drafter 'eagle'"):
            make_drafter("auto", model, "d")
    finally:
        drafters.SHIPPED_DIR = old
    assert isinstance(auto, CombinedDrafter) and isinstance(auto.mtp, MTPDraftSource)
    assert auto.mtp.min_confidence == 0.0 and auto.min_match == 2
    assert gated.mtp.min_confidence == 0.5 and gated.min_match == 3  # the settings chosen at shipping
    assert isinstance(alone, MTPDraftSource) and alone.min_confidence == 0.4  # MTP alone, when it measured fastest
    with pytest.raises(ValueError, match="unknown drafter"):
        make_drafter(str(tmp_path / "missing"), model)


def test_drafter_factory_loads_once_and_gives_each_sequence_its_own_state(tiny_dirs, tmp_path):
    """The server's drafters: one load of the weights, a fresh drafter per request; drafters
    used in turn on two sequences give what each gives alone (and plain decoding)."""
    import mtpdraft.drafters as drafters
    from mtpdraft.drafters import drafter_factory

    model, tok = model_and_tok(tiny_dirs, "gemma3_text")
    random_mtp(model, 0, True).drafter.save(tmp_path / "d")
    with pytest.raises(ValueError, match="unknown drafter"):
        drafter_factory(str(tmp_path / "missing"), model)
    assert drafter_factory("none", model)() is None
    old = drafters.SHIPPED_DIR
    try:
        drafters.SHIPPED_DIR = tmp_path
        (tmp_path / "d" / "auto.json").write_text('{"drafter": "eagle"}')
        with pytest.raises(ValueError, match="unknown drafter 'eagle'"):  # at resolve time, not per request
            drafter_factory("auto", model, "d")
        (tmp_path / "d" / "auto.json").write_text('{"min_match": 1, "sampled": {"drafter": "mtp"}}')
        new = drafter_factory("auto", model, "d")
    finally:
        drafters.SHIPPED_DIR = old
    a, b = new(), new()
    assert a is not b and a.greedy.ngram is not b.greedy.ngram  # per-sequence n-gram indexes
    assert a.greedy.mtp.drafter is b.greedy.mtp.drafter is a.sampled.drafter  # one copy of the weights
    path = drafter_factory(str(tmp_path / "d"), model)
    assert path().drafter is path().drafter
    sp = SamplingParams(max_new_tokens=24)
    prompts = [list(range(5, 30)), [7, 8, 9, 10] * 6]
    plain = [run(model, tok, p, sp)[0] for p in prompts]
    solo = [new(), new()]
    alone = [run(model, tok, p, sp, d) for p, d in zip(prompts, solo)]  # each sequence alone, its own drafter
    # the two stepped in turn (as the server's rows are), a and b: the same drafts, acceptance
    # and per-drafter round counts as alone (one shared drafter would count both sequences)
    stats = [Stats(), Stats()]
    gens = [generate(model, p, sp, drafter=d, spec=SpecParams(4), tokenizer=tok, stats=st)
            for p, d, st in zip(prompts, (a, b), stats)]
    outs, live = [[], []], [0, 1]
    while live:
        for i in list(live):
            try:
                outs[i].append(next(gens[i]))
            except StopIteration:
                live.remove(i)
    assert outs == plain == [o for o, _ in alone]
    for st, (_, st_alone) in zip(stats, alone):
        assert (st.cycles, st.proposed_by_pos, st.accepted_by_pos) == \
            (st_alone.cycles, st_alone.proposed_by_pos, st_alone.accepted_by_pos)
    assert [a.greedy.rounds, b.greedy.rounds] == [d.greedy.rounds for d in solo]
    assert a.greedy.rounds["mtp"] + b.greedy.rounds["mtp"] > 0 and b.greedy.rounds["ngram"] > 0
