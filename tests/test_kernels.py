import math
import os

import pytest
import torch

import mtpdraft.kernels as K


@pytest.fixture(autouse=True, scope="module")
def native_kernels():
    """These tests check the native kernels: where they do not load, that is a failure
    (a broken build must not pass CI as skips), unless MTPDRAFT_NO_NATIVE turns them off."""
    if K.native_available():
        return
    if os.environ.get("MTPDRAFT_NO_NATIVE", "") not in ("", "0"):
        pytest.skip("native kernels disabled by MTPDRAFT_NO_NATIVE")
    pytest.fail(f"mtpdraft's native kernels could not be loaded: {K._fail_reason or 'unknown reason'}\n"
                "(set MTPDRAFT_NO_NATIVE=1 to run without them)", pytrace=False)


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return g


# ---------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------
LIN_SHAPES = [(1, 8), (5, 7), (37, 640), (70, 643), (33, 16), (100, 25), (64, 2048), (131, 576)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("O,Kd", LIN_SHAPES)
def test_linear_matches_reference(dtype, O, Kd):
    g = _gen(O * 1000 + Kd)
    x = torch.randn(9, Kd, generator=g)
    w = torch.randn(O, Kd, generator=g).to(dtype)
    got = K.linear(x, w)
    ref = K.reference_linear(x, w)
    assert got.shape == (9, O) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * math.sqrt(Kd))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("O,Kd", [(70, 643), (131, 576), (40, 640), (9, 23)])
def test_linear_row_invariant_to_n(dtype, O, Kd):
    g = _gen(7 + O + Kd)
    x = torch.randn(33, Kd, generator=g)
    w = torch.randn(O, Kd, generator=g).to(dtype)
    single = [K.linear(x[i : i + 1], w) for i in range(33)]
    for n in range(1, 34):
        y = K.linear(x[:n], w)
        for i in range(n):
            assert torch.equal(y[i : i + 1], single[i]), (n, i)
    # any offset / sub-batch
    y = K.linear(x[5:12], w)
    for i in range(7):
        assert torch.equal(y[i : i + 1], single[5 + i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_row_independent_of_other_rows(dtype):
    g = _gen(3)
    x = torch.randn(17, 643, generator=g)
    w = torch.randn(97, 643, generator=g).to(dtype)
    y0 = K.linear(x, w)
    x2 = x.clone()
    x2[1:] = torch.randn(16, 643, generator=g) * 1e3
    y2 = K.linear(x2, w)
    assert torch.equal(y0[0], y2[0])
    x3 = x.clone()
    x3[:8] = 0.0
    y3 = K.linear(x3, w)
    assert torch.equal(y0[8:], y3[8:])


def test_linear_noncontiguous_x():
    g = _gen(11)
    x = torch.randn(64, 6, generator=g).t()  # [6, 64] non-contiguous
    w = torch.randn(20, 64, generator=g)
    torch.testing.assert_close(K.linear(x, w), K.reference_linear(x, w), rtol=1e-4, atol=1e-4)
    assert torch.equal(K.linear(x, w)[2], K.linear(x[2:3].contiguous(), w)[0])


# ---------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------
def _attn_inputs(seed, B, N, H, Hkv, D, C, dtype, start):
    g = _gen(seed)
    q = torch.randn(B, N, H, D, generator=g)
    kc = torch.randn(B, C, Hkv, D, generator=g).to(dtype)
    vc = torch.randn(B, C, Hkv, D, generator=g).to(dtype)
    # each batch row b has its queries at consecutive positions start[b] .. start[b]+N-1
    positions = torch.stack([torch.arange(s, s + N) for s in start]).long()
    return q, kc, vc, positions


ATTN_CASES = [
    # B, N, H, Hkv, D, C, window, softcap, starts
    (1, 4, 4, 1, 256, 64, 0, 0.0, [10]),
    (2, 5, 4, 1, 64, 40, 16, 0.0, [3, 70]),  # ring wrap-around with window
    (1, 7, 9, 3, 64, 32, 32, 50.0, [100]),  # full window = capacity, wrap, softcap
    (2, 3, 4, 2, 24, 30, 0, 30.0, [0, 20]),  # D not multiple of 8
    (1, 17, 4, 1, 256, 512, 128, 0.0, [300]),
    (1, 7, 9, 3, 64, 256, 0, 0.0, [200]),  # SmolLM2's heads, a verification step
    (3, 1, 8, 2, 32, 64, 0, 0.0, [5, 40, 63]),  # several rows, one query each
    (1, 5, 5, 1, 72, 64, 9, 0.0, [30]),  # odd query vectors per pair, D % 16 = 8, short window
    (1, 3, 2, 2, 20, 16, 0, 10.0, [2]),  # D < 16 with a tail, one head per kv head
    (1, 40, 9, 3, 64, 512, 0, 0.0, [300]),  # a prefill chunk: long key ranges (16-wide exps)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ATTN_CASES)
def test_attention_matches_reference(dtype, case):
    B, N, H, Hkv, D, C, window, softcap, starts = case
    q, kc, vc, pos = _attn_inputs(sum(starts) + N, B, N, H, Hkv, D, C, dtype, starts)
    scale = D**-0.5
    got = K.attention(q, kc, vc, pos, window=window, scale=scale, softcap=softcap)
    ref = K.reference_attention(q, kc, vc, pos, window=window, scale=scale, softcap=softcap)
    assert got.shape == q.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ATTN_CASES)
def test_attention_row_invariant(dtype, case):
    B, N, H, Hkv, D, C, window, softcap, starts = case
    q, kc, vc, pos = _attn_inputs(1 + N, B, N, H, Hkv, D, C, dtype, starts)
    kw = dict(window=window, scale=D**-0.5, softcap=softcap)
    full = K.attention(q, kc, vc, pos, **kw)
    for b in range(B):
        for i in range(N):
            one = K.attention(q[b : b + 1, i : i + 1], kc[b : b + 1], vc[b : b + 1], pos[b : b + 1, i : i + 1], **kw)
            assert torch.equal(one[0, 0], full[b, i]), (b, i)
        # prefixes of the query block
        for n in (1, 2, N):
            part = K.attention(q[b : b + 1, :n], kc[b : b + 1], vc[b : b + 1], pos[b : b + 1, :n], **kw)
            assert torch.equal(part[0], full[b, :n])
    # nor on the thread count (it decides how queries and heads are split into tasks)
    old = torch.get_num_threads()
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            assert torch.equal(K.attention(q, kc, vc, pos, **kw), full), t
    finally:
        torch.set_num_threads(old)
    # other rows' contents do not matter
    q2 = q.clone()
    q2[:, 1:] = torch.randn_like(q2[:, 1:]) * 10
    full2 = K.attention(q2, kc, vc, pos, **kw)
    assert torch.equal(full2[:, 0], full[:, 0])
    if B > 1:
        kc2, vc2 = kc.clone(), vc.clone()
        kc2[1:] = 0
        vc2[1:] = 1
        full3 = K.attention(q, kc2, vc2, pos, **kw)
        assert torch.equal(full3[0], full[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ATTN_CASES)
def test_attention_avx512_passes_give_the_avx2_bits(dtype, case):
    """Where the CPU has AVX-512, attention runs its AVX-512 passes; they must give exactly the
    AVX2 passes' bits (and so the same bits on either kind of CPU)."""
    mod = K._load()
    if mod is None or not mod._attention_avx512():
        pytest.skip("no AVX-512 on this CPU: only the AVX2 passes run")
    B, N, H, Hkv, D, C, window, softcap, starts = case
    q, kc, vc, pos = _attn_inputs(7 + N, B, N, H, Hkv, D, C, dtype, starts)
    kw = dict(window=window, scale=D**-0.5, softcap=softcap)
    fast = K.attention(q, kc, vc, pos, **kw)
    try:
        mod._set_attention_avx512(0)
        assert not mod._attention_avx512()
        slow = K.attention(q, kc, vc, pos, **kw)
    finally:
        mod._set_attention_avx512(-1)
    assert torch.equal(fast, slow)


def test_attention_avx512_passes_random_positions():
    """Rows whose key ranges differ arbitrarily (random positions, several windows, ring wrap):
    the AVX-512 passes' bits are still the AVX2 passes'."""
    mod = K._load()
    if mod is None or not mod._attention_avx512():
        pytest.skip("no AVX-512 on this CPU: only the AVX2 passes run")
    g = _gen(11)
    B, N, H, Hkv, D, C = 2, 9, 6, 2, 40, 48
    q = torch.randn(B, N, H, D, generator=g)
    kc, vc = torch.randn(B, C, Hkv, D, generator=g), torch.randn(B, C, Hkv, D, generator=g)
    pos = torch.randint(0, 300, (B, N), generator=g)
    for window, softcap in ((0, 0.0), (1, 0.0), (7, 0.0), (48, 20.0)):
        kw = dict(window=window, scale=0.15, softcap=softcap)
        fast = K.attention(q, kc, vc, pos, **kw)
        try:
            mod._set_attention_avx512(0)
            slow = K.attention(q, kc, vc, pos, **kw)
        finally:
            mod._set_attention_avx512(-1)
        assert torch.equal(fast, slow), (window, softcap)


def test_attention_matches_reference_random_positions():
    g = _gen(5)
    B, N, H, Hkv, D, C = 3, 6, 4, 1, 64, 48
    q = torch.randn(B, N, H, D, generator=g)
    kc = torch.randn(B, C, Hkv, D, generator=g)
    vc = torch.randn(B, C, Hkv, D, generator=g)
    pos = torch.randint(0, 500, (B, N), generator=g)
    for window in (1, 7, 48):
        got = K.attention(q, kc, vc, pos, window=window, scale=0.125)
        ref = K.reference_attention(q, kc, vc, pos, window=window, scale=0.125)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    pos = torch.randint(0, C, (B, N), generator=g)
    got = K.attention(q, kc, vc, pos, scale=0.125, softcap=20.0)
    ref = K.reference_attention(q, kc, vc, pos, scale=0.125, softcap=20.0)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# packed weights: same bits as the row-major kernel, for any row count
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("O,Kd", [(1, 16), (4, 32), (7, 640), (131, 576), (1001, 64)])
def test_packed_linear_identical_to_unpacked(dtype, O, Kd):
    g = _gen(O + 5 * Kd)
    w = torch.randn(O, Kd, generator=g).to(dtype)
    wp = K.pack(w)
    assert isinstance(wp, K.Packed) and wp.shape == w.shape
    rows = K.PACKED_MAX_ROWS + 2
    x = torch.randn(rows, Kd, generator=g)
    for n in range(1, rows + 1):  # every x grouping of the packed path (n <= PACKED_MAX_ROWS) and the fallback
        assert torch.equal(K.linear(x[:n], wp), K.linear(x[:n], w)), n
    x3 = torch.randn(2, 3, Kd, generator=g)  # leading dims are kept
    assert torch.equal(K.linear(x3, wp), K.linear(x3, w))


def test_pack_refuses_unfit_shapes_and_stale_weights_fall_back():
    w = torch.randn(10, 24).bfloat16()  # K not a multiple of 16
    assert K.pack(w) is w
    w = torch.randn(10, 32).bfloat16()
    wp = K.pack(w)
    x = torch.randn(1, 32)
    before = K.linear(x, wp)
    w.mul_(2)  # in place: the packed copy is stale and must not be used
    assert not wp.fresh
    assert torch.equal(K.linear(x, wp), K.linear(x, w))
    assert not torch.equal(K.linear(x, wp), before)


# ---------------------------------------------------------------------------
# fused per-row ops
# ---------------------------------------------------------------------------
def _rows_invariant(fn, x):
    """fn's result for each row of x is the same bits whatever rows share the call."""
    full = fn(x)
    for i in range(x.shape[0]):
        assert torch.equal(fn(x[i : i + 1])[0], full[i]), i
        assert torch.equal(fn(x[: i + 1])[i], full[i]), i


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D,offset", [(640, 1.0), (37, 0.0), (256, 1.0)])
def test_rmsnorm_matches_reference_and_is_row_invariant(wdtype, D, offset):
    g = _gen(D)
    x = torch.randn(11, D, generator=g) * 3
    w = (torch.randn(D, generator=g) * 0.1).to(wdtype)
    torch.testing.assert_close(K.rmsnorm(x, w, 1e-6, offset), K.reference_rmsnorm(x, w, 1e-6, offset),
                               rtol=1e-5, atol=1e-5)
    _rows_invariant(lambda t: K.rmsnorm(t, w, 1e-6, offset), x)


@pytest.mark.parametrize("post", [True, False])
def test_add_rmsnorm_matches_reference(post):
    g = _gen(5)
    x, h = torch.randn(2, 3, 640, generator=g), torch.randn(2, 3, 640, generator=g) * 5
    wp, wn = torch.randn(640, generator=g).bfloat16(), torch.randn(640, generator=g)
    got = K.add_rmsnorm(x, h, wp if post else None, wn, 1e-6, 1.0)
    ref = K.reference_add_rmsnorm(x, h, wp if post else None, wn, 1e-6, 1.0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    x_only, none = K.add_rmsnorm(x, h, wp if post else None, None, 1e-6, 1.0)
    assert none is None and torch.equal(x_only, got[0])
    xs, hs = x.reshape(6, 640), h.reshape(6, 640)
    _rows_invariant(lambda t: K.add_rmsnorm(t[:, 0], t[:, 1], wp, wn, 1e-6, 1.0)[1], torch.stack([xs, hs], 1))


@pytest.mark.parametrize("act", ["gelu_tanh", "silu"])
@pytest.mark.parametrize("inter", [2048, 13])
def test_gated_act_matches_reference(act, inter):
    g = _gen(inter)
    gu = torch.randn(7, 2 * inter, generator=g) * 4
    gu[0, :5] = torch.tensor([0.0, -30.0, 30.0, 1e-4, -1e-4])
    torch.testing.assert_close(K.gated_act(gu, act), K.reference_gated_act(gu, act), rtol=2e-6, atol=2e-6)
    _rows_invariant(lambda t: K.gated_act(t, act), gu)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_qkv_rope_cache_matches_reference(cache_dtype, qk_norm):
    g = _gen(17)
    B, N, H, Hkv, D, C = 2, 5, 4, 2, 64, 8
    qkv = torch.randn(B, N, (H + 2 * Hkv) * D, generator=g)
    positions = torch.tensor([[3, 4, 5, 6, 7], [6, 7, 8, 9, 10]])  # row 1 wraps the ring buffer
    qn = (torch.randn(D, generator=g) * 0.1).bfloat16() if qk_norm else None
    kn = (torch.randn(D, generator=g) * 0.1).bfloat16() if qk_norm else None
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    caches = [(torch.zeros(B, C, Hkv, D, dtype=cache_dtype), torch.zeros(B, C, Hkv, D, dtype=cache_dtype))
              for _ in range(2)]
    q = K.qkv_rope_cache(qkv, positions, H, Hkv, qn, kn, 1e-6, 1.0, inv, *caches[0])
    q_ref = K.reference_qkv_rope_cache(qkv, positions, H, Hkv, qn, kn, 1e-6, 1.0, inv, *caches[1])
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    for got, ref in zip(caches[0], caches[1]):
        torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2 if cache_dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-5)
    assert torch.equal(caches[0][1], caches[1][1])  # v is copied (and rounded) exactly like torch
    # one token at a time writes the same cache and the same q rows as five at once
    k1, v1 = torch.zeros_like(caches[0][0]), torch.zeros_like(caches[0][1])
    for i in range(N):
        qi = K.qkv_rope_cache(qkv[:, i:i + 1], positions[:, i:i + 1], H, Hkv, qn, kn, 1e-6, 1.0, inv, k1, v1)
        assert torch.equal(qi[:, 0], q[:, i])
    assert torch.equal(k1, caches[0][0]) and torch.equal(v1, caches[0][1])


@pytest.mark.parametrize("kv_mode", [0, 1, 2])
def test_qkv_rope_cache_gemma4_modes(kv_mode):
    """Gemma 4: v RMS-normed without a scale; K as V (kv_mode 1); a KV-shared layer's
    q-only step (kv_mode 2) writes nothing. Native == reference, one row == many."""
    g = _gen(23)
    B, N, H, Hkv, D, C = 2, 4, 4, 2, 64, 16
    width = (H + (2 * Hkv if kv_mode == 0 else Hkv if kv_mode == 1 else 0)) * D
    qkv = torch.randn(B, N, width, generator=g) * 3
    positions = torch.tensor([[2, 3, 4, 5], [9, 10, 11, 12]])
    qn, kn = torch.randn(D, generator=g) * 0.1 + 1, torch.randn(D, generator=g) * 0.1 + 1
    inv = torch.cat([1.0 / (1e6 ** (torch.arange(0, D // 4, 2).float() / D)), torch.zeros(D // 2 - D // 8)])
    caches = [(torch.full((B, C, Hkv, D), 7.0), torch.full((B, C, Hkv, D), 7.0)) for _ in range(2)]
    q = K.qkv_rope_cache(qkv, positions, H, Hkv, qn, kn, 1e-6, 0.0, inv, *caches[0], kv_mode, True)
    q_ref = K.reference_qkv_rope_cache(qkv, positions, H, Hkv, qn, kn, 1e-6, 0.0, inv, *caches[1], kv_mode, True)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    for got, ref in zip(caches[0], caches[1]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    k, v = caches[0]
    if kv_mode == 2:
        assert (k == 7).all() and (v == 7).all()
    else:
        written = v[1, 9:13]
        torch.testing.assert_close(written.pow(2).mean(-1), torch.ones(N, Hkv), rtol=1e-4, atol=1e-4)  # unscaled
        raw_k = qkv[1, :, H * D:(H + Hkv) * D].reshape(N, Hkv, D)
        if kv_mode == 1:  # V is the raw K, normed
            torch.testing.assert_close(written, raw_k * torch.rsqrt(raw_k.pow(2).mean(-1, keepdim=True) + 1e-6))
    k1, v1 = torch.full_like(k, 7.0), torch.full_like(v, 7.0)
    for i in range(N):
        qi = K.qkv_rope_cache(qkv[:, i:i + 1], positions[:, i:i + 1], H, Hkv, qn, kn, 1e-6, 0.0, inv, k1, v1,
                              kv_mode, True)
        assert torch.equal(qi[:, 0], q[:, i])
    assert torch.equal(k1, k) and torch.equal(v1, v)


def test_softcap_matches_tanh_and_is_position_invariant():
    g = _gen(29)
    V = 262_144  # Gemma's vocabulary: above torch's grain size, so its tanh would chunk by thread
    x = torch.randn(5, V, generator=g) * 40
    ref = K.reference_softcap(x, 30.0)
    got = K.softcap(x.clone(), 30.0)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert got.abs().max() <= 30.0
    old = torch.get_num_threads()
    try:
        for n in range(1, 6):  # a row's bits do not depend on how many rows share the call, nor threads
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                assert torch.equal(K.softcap(x[:n].clone(), 30.0), got[:n])
    finally:
        torch.set_num_threads(old)
    odd = torch.randn(3, 13, generator=g) * 50  # a zero-padded tail takes the same lane arithmetic
    assert torch.equal(K.softcap(odd.clone(), 30.0)[1], K.softcap(odd[1:2].clone(), 30.0)[0])
