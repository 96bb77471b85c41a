"""One runner pushes a tiny random config of every family through the same checks."""

import pytest
import torch

import mtpdraft
from mtpdraft.testing import TINY_CONFIGS

FAMILIES = list(TINY_CONFIGS)


def load(tiny_dirs, fam, dtype="fp32"):
    model, tok = mtpdraft.load(str(tiny_dirs[fam]), dtype)
    return model


def seq(n, vocab=512, seed=0):
    return torch.randint(4, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fam", FAMILIES)
def test_matches_transformers(tiny_dirs, fam):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(tiny_dirs[fam]), dtype=torch.float32).eval()
    model = load(tiny_dirs, fam)
    ids = seq(40)  # longer than the tiny sliding window (8)
    with torch.no_grad():
        want = ref(ids).logits[0]
    got = model(ids, model.new_cache(1, 128)).logits[0]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_cache_matches_full_forward(tiny_dirs, fam, dtype):
    model = load(tiny_dirs, fam, dtype)
    ids = seq(30)
    full = model(ids, model.new_cache(1, 64)).logits[0]
    cache = model.new_cache(1, 64, max_chunk=16)
    steps = [model(ids[:, i:i + 1], cache).logits[0, 0] for i in range(ids.shape[1])]
    torch.testing.assert_close(torch.stack(steps), full, atol=1e-4 if dtype == "fp32" else 2e-2, rtol=1e-3)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_batch_invariance(tiny_dirs, fam, dtype):
    """A position's logits are bit-identical whether it shares the forward with 0..31 others."""
    model = load(tiny_dirs, fam, dtype)
    prefix, tail = seq(20), seq(32, seed=1)
    cache = model.new_cache(1, 128, max_chunk=64)
    model.prefill(prefix, cache)
    base = cache.lengths[0]
    alone = model(tail[:, :1], cache).logits[0, 0]
    for n in range(1, 33):
        cache.truncate(0, base)
        out = model(tail[:, :n], cache).logits[0]
        assert torch.equal(out[0], alone), f"row 0 differs for n={n}"
    # and the last position of an n-token forward equals step-by-step decoding
    cache.truncate(0, base)
    stepwise = [model(tail[:, i:i + 1], cache).logits[0, 0] for i in range(8)]
    cache.truncate(0, base)
    batched = model(tail[:, :8], cache).logits[0]
    for i in range(8):
        assert torch.equal(batched[i], stepwise[i]), f"position {i} differs"


@pytest.mark.parametrize("fam", FAMILIES)
def test_rollback_then_recompute(tiny_dirs, fam):
    model = load(tiny_dirs, fam)
    ids, junk = seq(24), seq(6, seed=5)
    cache = model.new_cache(1, 64, max_chunk=16)
    model.prefill(ids[:, :16], cache)
    want = model(ids[:, 16:], cache).logits
    cache.truncate(0, 16)
    model(junk, cache)  # rejected draft: written, then rolled back
    cache.truncate(0, 16)
    got = model(ids[:, 16:], cache).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("fam", FAMILIES)
def test_batch_rows_independent(tiny_dirs, fam):
    model = load(tiny_dirs, fam)
    a, b = seq(12, seed=2), seq(12, seed=3)
    both = model(torch.cat([a, b]), model.new_cache(2, 32)).logits
    alone_a = model(a, model.new_cache(1, 32)).logits
    alone_b = model(b, model.new_cache(1, 32)).logits
    assert torch.equal(both[0], alone_a[0]) and torch.equal(both[1], alone_b[0])


def test_context_overflow_is_a_clear_error(tiny_dirs):
    model = load(tiny_dirs, "llama")
    cache = model.new_cache(1, 16)
    with pytest.raises(ValueError, match="context full"):
        model(seq(17), cache)


def test_bad_inputs_are_clear_errors(tmp_path, tiny_dirs):
    with pytest.raises(ValueError, match="unknown model"):
        mtpdraft.load("no-such-model")
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported architecture"):
        mtpdraft.load(str(tmp_path))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_dirs["llama"] / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="malformed checkpoint"):
        mtpdraft.load(str(bad))
    with pytest.raises(ValueError, match="dtype"):
        mtpdraft.load(str(tiny_dirs["llama"]), "fp8")
