"""Gemma 4 at its published widths: random weights, few layers, built by transformers.

Tiny test models sit below every size threshold (vocabulary, MLP width, torch's
grain size); these use the real E2B and E4B text widths, so every kernel sees the
shapes a user's checkpoint gives it. Widths as Google's gemma.cpp (gemma/configs.cc:
ConfigGemma4_2B_LM, ConfigGemma4_E4B_LM) and NVIDIA's Megatron-Bridge E4B recipe
state them: E2B hidden 1536, MLP 6144 (12288 in its KV-shared layers), 8 query
heads over 1 KV head; E4B hidden 2560, MLP 10240, 8 over 2; both head_dim 256
(sliding) / 512 (full), per-layer inputs of width 256, vocabulary 262,144, window
512, final softcap 30. Four layers (sliding, full, then both KV-shared) instead of
35 / 42. The assistant has the official layout at the published size (~76M
parameters: width 256, 4 layers, 2,048 clusters, top 32), built by transformers
5.10.4 when MTPDRAFT_TF_REFERENCE points at it (see test_gemma4.py), otherwise
written by hand in the same layout.

Checked: fp32 logits against transformers; a row's logits do not depend on how
many rows share the forward (1..8) nor on the thread count (1, 2, 3); greedy
speculative decoding with the assistant equals plain decoding at k = 1..6 in fp32
and bf16 at 1, 2 and 3 threads.
"""

from __future__ import annotations

import gc
import json
import subprocess
from pathlib import Path

import pytest
import torch

from mtpdraft.config import SamplingParams, SpecParams
from mtpdraft.decoding import generate
from mtpdraft.drafters.gemma4_assistant import load_gemma4_assistant
from mtpdraft.drafters.mtp import MTPDraftSource
from mtpdraft.models import load_model_dir

transformers = pytest.importorskip("transformers")

from test_gemma4 import reference_command  # noqa: E402

pytestmark = pytest.mark.slow

V = 262_144
S, F = "sliding_attention", "full_attention"
COMMON = dict(vocab_size=V, vocab_size_per_layer_input=V, hidden_size_per_layer_input=256, head_dim=256,
              global_head_dim=512, num_attention_heads=8, sliding_window=512, final_logit_softcapping=30.0,
              num_hidden_layers=4, layer_types=[S, F, S, F], num_kv_shared_layers=2,
              max_position_embeddings=4096)
SIZES = {
    "e2b": dict(hidden_size=1536, intermediate_size=6144, num_key_value_heads=1, use_double_wide_mlp=True),
    "e4b": dict(hidden_size=2560, intermediate_size=10240, num_key_value_heads=2),
}
PROMPT = torch.randint(3, V, (12,), generator=torch.Generator().manual_seed(11)).tolist()
N_NEW = 6
THREADS = (1, 2, 3)


def assistant_config(size: str) -> tuple[dict, dict]:
    text = dict(hidden_size=256, intermediate_size=2048, num_hidden_layers=4, layer_types=[S, S, S, F],
                num_attention_heads=4, num_key_value_heads=SIZES[size]["num_key_value_heads"], head_dim=256,
                global_head_dim=512, vocab_size=V, sliding_window=512, hidden_size_per_layer_input=0,
                vocab_size_per_layer_input=0)
    return text, dict(backbone_hidden_size=SIZES[size]["hidden_size"], use_ordered_embeddings=True,
                      num_centroids=2048, centroid_intermediate_top_k=32)


ASSISTANT_SCRIPT = r"""
import json, sys, torch
from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM
out, text, kw = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
torch.manual_seed(0)
a = Gemma4AssistantForCausalLM(Gemma4AssistantConfig(text_config=text, **kw)).eval()
with torch.no_grad():
    for n, p in a.named_parameters():
        p.add_(torch.randn_like(p) * (0.05 if p.ndim == 1 else 0.02))
    a.masked_embedding.token_ordering.copy_(torch.randperm(text["vocab_size"]))
a.save_pretrained(out)
"""


def write_assistant(path: Path, size: str) -> Path:
    text, kw = assistant_config(size)
    cmd = reference_command()
    if cmd is not None:  # transformers' own class (5.10.4)
        exe, env = cmd
        r = subprocess.run(exe + ["-c", ASSISTANT_SCRIPT, str(path), json.dumps(text), json.dumps(kw)], env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"building the assistant failed:\n{r.stderr[-3000:]}"
        return path
    from mtpdraft.testing import gemma4_assistant_dir

    return gemma4_assistant_dir(path, text, kw)


@pytest.fixture(scope="module", params=sorted(SIZES))
def sized(request, tmp_path_factory):
    """(size, target directory, transformers' fp32 logits over PROMPT, assistant directory)."""
    size = request.param
    torch.manual_seed(0)  # transformers initializes from the global RNG
    hf = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**(COMMON | SIZES[size]))).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms and layer scalars start at 1: perturb them so they are tested
        for _, p in hf.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for n, b in hf.named_buffers():
            if n.endswith("layer_scalar"):
                b.fill_(0.9)
        ref = hf(torch.tensor([PROMPT])).logits[0]
    path = tmp_path_factory.mktemp(f"gemma4_{size}")
    hf.save_pretrained(path)
    del hf
    gc.collect()
    yield size, path, ref, write_assistant(tmp_path_factory.mktemp(f"assistant_{size}"), size)
    gc.collect()


def with_threads(n: int, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def test_fp32_logits_match_transformers(sized):
    size, path, ref, _ = sized
    ours = load_model_dir(path, "fp32")
    got = ours(torch.tensor([PROMPT]), ours.new_cache(1, 64)).logits[0]
    assert got.shape == (len(PROMPT), V)
    torch.testing.assert_close(got, ref, rtol=0, atol=5e-4)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_row_bits_do_not_depend_on_row_count_or_threads(sized, dtype):
    _, path, _, _ = sized
    model = load_model_dir(path, dtype)
    nxt = torch.randint(3, V, (1, 8), generator=torch.Generator().manual_seed(4))
    cache = model.new_cache(1, 64)
    model.prefill(torch.tensor([PROMPT]), cache)

    def rows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache.truncate(0, len(PROMPT))
        o = model(nxt[:, :n], cache)
        return o.logits[0], o.hidden[0]

    full_logits, full_hidden = rows(8)
    for t in THREADS:
        for n in range(1, 9):
            logits, hidden = with_threads(t, lambda: rows(n))
            assert torch.equal(logits, full_logits[:n]), (t, n)
            assert torch.equal(hidden, full_hidden[:n]), (t, n)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_assistant_speculation_equals_plain(sized, dtype):
    _, path, _, assistant = sized
    target = load_model_dir(path, dtype)
    drafter = MTPDraftSource(load_gemma4_assistant(assistant, target.dtype, target=target))
    sp = SamplingParams(max_new_tokens=N_NEW)
    plain = with_threads(2, lambda: list(generate(target, PROMPT, sp)))
    assert len(plain) == N_NEW
    for t in THREADS:
        assert with_threads(t, lambda: list(generate(target, PROMPT, sp))) == plain, t
        for k in range(1, 7):
            spec = with_threads(t, lambda: list(generate(target, PROMPT, sp, drafter=drafter,
                                                         spec=SpecParams(draft_len=k, adaptive=False))))
            assert spec == plain, (t, k)
