"""Gemma 4: parity with transformers' own classes on tiny random checkpoints.

The text decoder is checked against the installed transformers. The official
assistant (gemma4_assistant) cannot be constructed by transformers 5.23 (see
DESIGN.md 7), so its reference runs in a subprocess with transformers 5.10.4,
found through MTPDRAFT_TF_REFERENCE: either a python executable that imports
transformers 5.10.4, or a directory to put first on PYTHONPATH of this python
(e.g. made by `pip install --target DIR --no-deps transformers==5.10.4
tokenizers==0.22.2 "huggingface_hub>=1.5,<2" kernels==0.12.3`; scripts/test.sh does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtpdraft.config import SamplingParams, SpecParams
from mtpdraft.decoding import generate
from mtpdraft.drafters.gemma4_assistant import load_gemma4_assistant
from mtpdraft.drafters.mtp import MTPDraftSource
from mtpdraft.models import load_model_dir

transformers = pytest.importorskip("transformers")
Gemma4TextConfig = pytest.importorskip("transformers").Gemma4TextConfig

V = 256
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention",
               "sliding_attention", "sliding_attention", "full_attention"]
COMMON = dict(vocab_size=V, num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
              sliding_window=8)
CASES = {
    "dense": dict(),
    "edge": dict(hidden_size_per_layer_input=8, num_kv_shared_layers=2, attention_k_eq_v=True,
                 num_global_key_value_heads=1, use_double_wide_mlp=True),
    "moe": dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                attention_k_eq_v=True, num_global_key_value_heads=1),
}


def text_config(**kw):
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=6, layer_types=LAYER_TYPES,
                hidden_size_per_layer_input=0, vocab_size_per_layer_input=V, final_logit_softcapping=30.0, **COMMON)
    return Gemma4TextConfig(**(base | kw))


def randomize(model, seed=0):
    """transformers initializes norms to 1 and layer_scalar to 1: perturb them so they are tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.05 if p.ndim == 1 else 0.02))
        for n, b in model.named_buffers():
            if n.endswith("layer_scalar"):
                b.fill_(0.9)
    return model


def greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    """Prefill, then one token per forward through our cache."""
    cache = model.new_cache(1, 128)
    out = model.prefill(ids, cache)
    toks = []
    for _ in range(n):
        toks.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([[toks[-1]]]), cache)
    return toks


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(sorted(CASES).index(request.param))  # init draws from the global RNG: same weights in any test order
    hf = randomize(transformers.Gemma4ForCausalLM(text_config(**CASES[request.param])).eval())
    path = tmp_path_factory.mktemp(f"gemma4_{request.param}")
    hf.save_pretrained(path)
    return hf, path


def test_logits_and_greedy_match_transformers(checkpoint):
    hf, path = checkpoint
    ours = load_model_dir(path, "fp32")
    ids = torch.randint(3, V, (1, 21), generator=torch.Generator().manual_seed(1))  # longer than the window
    with torch.no_grad():
        ref = hf(ids).logits
    got = ours(ids, ours.new_cache(1, 128), logits="all").logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    expect = hf.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
    # generate() stops at the config's EOS; our helper does not, so compare up to where it stopped
    eos = hf.generation_config.eos_token_id
    assert len(expect) == 20 or expect[-1] in (eos if isinstance(eos, list) else [eos])
    assert greedy(ours, ids, 20)[:len(expect)] == expect


def test_kv_shared_layers_read_their_source_cache(tmp_path):
    hf = randomize(transformers.Gemma4ForCausalLM(text_config(**CASES["edge"])).eval())
    hf.save_pretrained(tmp_path)
    ours = load_model_dir(tmp_path, "fp32")
    cache = ours.new_cache(1, 64)
    assert cache.layers[4] is cache.layers[3] and cache.layers[5] is cache.layers[2]
    assert not hasattr(ours.model.layers[4].self_attn, "k_proj")


@pytest.mark.parametrize("case", ["dense", "edge", "moe"])
def test_multimodal_checkpoint_loads_text_part_with_warning(case, tmp_path):
    """A Gemma4ForConditionalGeneration checkpoint as transformers writes it (vision and
    audio towers, model.language_model.* names): the text decoder loads, the towers are
    skipped with one warning, and the logits are the full model's on text input."""
    from transformers.models.gemma4 import configuration_gemma4 as cg

    torch.manual_seed(5)
    vision = cg.Gemma4VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, head_dim=8, position_embedding_size=64)
    audio = cg.Gemma4AudioConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, output_proj_dims=32)
    cfg = cg.Gemma4Config(text_config=text_config(**CASES[case]), vision_config=vision, audio_config=audio)
    hf = randomize(transformers.Gemma4ForConditionalGeneration(cfg).eval())
    hf.save_pretrained(tmp_path)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert any(n.startswith("model.vision_tower.") for n in names) and any(n.startswith("model.audio_tower.") for n in names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = load_model_dir(tmp_path, "fp32")
    assert [str(w.message) for w in caught if "not supported" in str(w.message)] == [
        "gemma4: loading the text decoder only; image, video and audio inputs are not supported "
        "(their encoders are skipped)"]
    ids = torch.randint(3, V, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    torch.testing.assert_close(ours(ids, ours.new_cache(1, 32)).logits, ref, rtol=0, atol=1e-4)


# -- the official assistant ------------------------------------------------------------

ASSISTANT_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0,
                      vocab_size_per_layer_input=0, **COMMON)
ASSISTANT = dict(backbone_hidden_size=64, use_ordered_embeddings=True, num_centroids=16, centroid_intermediate_top_k=4)

# Runs under transformers 5.10.4: writes target/, assistant/ and ref.pt into argv[1].
REFERENCE_SCRIPT = r"""
import json, sys, torch, transformers
from transformers import Gemma4TextConfig, Gemma4ForCausalLM, Gemma4AssistantConfig, Gemma4AssistantForCausalLM
out = sys.argv[1]
tcfg, acfg, akw = (json.loads(a) for a in sys.argv[2:5])
torch.manual_seed(0)
target = Gemma4ForCausalLM(Gemma4TextConfig(**tcfg)).eval()
asst = Gemma4AssistantForCausalLM(Gemma4AssistantConfig(text_config=acfg, **akw)).eval()
with torch.no_grad():
    for m in (target, asst):
        for n, p in m.named_parameters():
            p.add_(torch.randn_like(p) * (0.05 if p.ndim == 1 else 0.02))
    asst.masked_embedding.token_ordering.copy_(torch.randperm(tcfg["vocab_size"]))
target.save_pretrained(out + "/target")
asst.save_pretrained(out + "/assistant")
ids = torch.randint(3, tcfg["vocab_size"], (1, 20))
L = ids.shape[1]
with torch.no_grad():
    o = target(ids, use_cache=True, output_hidden_states=True, return_shared_kv_states=True)
    tok, h, steps = o.logits[:, -1:].argmax(-1), o.hidden_states[-1][:, -1:], []
    # what SinglePositionMultiTokenCandidateGenerator does for the first round after a prefill
    for _ in range(3):
        e = target.get_input_embeddings()(tok)
        ao = asst(inputs_embeds=torch.cat([e, h], -1), attention_mask=torch.ones(1, L + 1, dtype=torch.long),
                  position_ids=torch.tensor([[L]]), shared_kv_states=o.shared_kv_states, use_cache=False)
        steps.append(ao.logits[0, 0])
        tok, h = ao.logits.argmax(-1), ao.last_hidden_state
    plain = target.generate(ids, max_new_tokens=30, do_sample=False)
    spec = target.generate(ids, max_new_tokens=30, do_sample=False, assistant_model=asst)
torch.save(dict(ids=ids, steps=torch.stack(steps), plain=plain, spec=spec, version=transformers.__version__),
           out + "/ref.pt")
"""


def reference_command() -> tuple[list[str], dict] | None:
    ref = os.environ.get("MTPDRAFT_TF_REFERENCE")
    if not ref:
        return None
    env = dict(os.environ)
    if Path(ref).is_dir():
        env["PYTHONPATH"] = ref + os.pathsep + env.get("PYTHONPATH", "")
        return [sys.executable], env
    return [ref], env


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cmd = reference_command()
    if cmd is None:
        pytest.skip("set MTPDRAFT_TF_REFERENCE to a transformers 5.10.4 python (or a PYTHONPATH dir holding it): "
                    "transformers 5.23 cannot build Gemma4AssistantForCausalLM")
    exe, env = cmd
    out = tmp_path_factory.mktemp("gemma4_assistant_ref")
    tcfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=6, layer_types=LAYER_TYPES,
                hidden_size_per_layer_input=8, vocab_size_per_layer_input=V, num_kv_shared_layers=2,
                final_logit_softcapping=30.0, **COMMON)
    args = [json.dumps(tcfg), json.dumps(ASSISTANT_TEXT), json.dumps(ASSISTANT)]
    r = subprocess.run(exe + ["-c", REFERENCE_SCRIPT, str(out), *args], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"reference run failed:\n{r.stderr[-3000:]}"
    return out, torch.load(out / "ref.pt")


def test_assistant_step_logits_match_transformers(reference):
    out, ref = reference
    target = load_model_dir(out / "target", "fp32")  # also the global_head_dim config layout of 5.10
    drafter = load_gemma4_assistant(out / "assistant", torch.float32, target=target)
    ids = ref["ids"]
    cache = target.new_cache(1, 128)
    o = target.prefill(ids, cache)
    tok, h = o.logits[0, -1:].argmax(-1), o.hidden[:, -1]
    pos, srcs = torch.tensor([[cache.lengths[0] - 1]]), drafter.sources(target, cache)
    for i in range(3):
        sel, logits, h = drafter.step(target, tok, h, pos, srcs)
        r = ref["steps"][i]
        kept = r > r.min()  # transformers fills the unselected clusters with min - 1
        assert set(sel[0].tolist()) == set(kept.nonzero()[:, 0].tolist())
        torch.testing.assert_close(logits[0], r[sel[0]], rtol=0, atol=1e-4)
        tok = sel[0, logits[0].argmax()].view(1)
        assert int(tok) == int(r.argmax())


def test_assisted_generation_equals_plain_and_transformers(reference):
    out, ref = reference
    assert ref["spec"].tolist() == ref["plain"].tolist()  # the reference itself is lossless
    target = load_model_dir(out / "target", "fp32")
    drafter = MTPDraftSource(load_gemma4_assistant(out / "assistant", torch.float32, target=target))
    prompt = ref["ids"][0].tolist()
    got = list(generate(target, prompt, SamplingParams(max_new_tokens=30), drafter=drafter,
                        spec=SpecParams(draft_len=3)))
    assert got == ref["plain"][0, len(prompt):].tolist()


# -- the assistant loader without the reference (hand-written checkpoint) -------------------

def write_assistant(path: Path, backbone: int = 64, seed: int = 0) -> Path:
    """A gemma4_assistant directory with the official layout, random weights."""
    from mtpdraft.testing import gemma4_assistant_dir

    return gemma4_assistant_dir(path, ASSISTANT_TEXT, ASSISTANT | {"backbone_hidden_size": backbone}, seed=seed,
                                std=0.1)


def test_assistant_is_lossless_through_the_engine(checkpoint, tmp_path):
    hf, path = checkpoint
    target = load_model_dir(path, "fp32")
    drafter = MTPDraftSource(load_gemma4_assistant(write_assistant(tmp_path / "a"), target=target))
    prompt = torch.randint(3, V, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    plain = list(generate(target, prompt, SamplingParams(max_new_tokens=24)))
    spec = list(generate(target, prompt, SamplingParams(max_new_tokens=24), drafter=drafter,
                         spec=SpecParams(draft_len=4)))
    assert spec == plain


def test_assistant_mismatch_is_an_error_before_generation(checkpoint, tmp_path):
    _, path = checkpoint
    target = load_model_dir(path, "fp32")
    with pytest.raises(ValueError, match="backbone_hidden_size"):
        load_gemma4_assistant(write_assistant(tmp_path / "wide", backbone=48), target=target)
    bad = write_assistant(tmp_path / "vocab")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"] = dict(cfg["text_config"], global_head_dim=64)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape|head_dim"):
        load_gemma4_assistant(bad, target=target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llama_like = tmp_path / "notgemma"
        llama_like.mkdir()
        (llama_like / "config.json").write_text(json.dumps({"model_type": "mtpdraft_mtp"}))
        with pytest.raises(ValueError, match="gemma4_assistant"):
            load_gemma4_assistant(llama_like)


def test_assistant_for_a_quantized_target_drafts_with_q8_0_matrices(checkpoint, tmp_path):
    """As our own drafters: an assistant loaded for a quantized target holds Q8_0 matrices (a
    dense target's keeps its own), its step stays near the dense one's, it refuses to be saved,
    and speculative greedy output is still plain greedy's."""
    from mtpdraft import kernels
    from mtpdraft.drafters import make_drafter

    _, path = checkpoint
    a = write_assistant(tmp_path / "a")
    dense_target = load_model_dir(path, "fp32")
    assert not make_drafter(str(a), dense_target).drafter.quantized
    target = load_model_dir(path, "q8_0")
    assert target.quantized
    src = make_drafter(str(a), target)
    q, dense = src.drafter, load_gemma4_assistant(a, target.dtype, target=target)
    assert q.quantized and isinstance(q.model.layers[0].mlp.down_proj.qweight, kernels.QWeight)
    assert q.model.layers[1].self_attn.q_proj.weight.numel() == 0
    prompt = torch.randint(3, V, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    cache = target.new_cache(1, 64)
    with torch.inference_mode():
        hidden = target.prefill(torch.tensor([prompt]), cache).hidden[0, -1]
        positions = torch.tensor([[len(prompt) - 1]])
        h = hidden[None].float()
        got, want = (d.step(target, torch.tensor([7]), h, positions, d.sources(target, cache)) for d in (q, dense))
    torch.testing.assert_close(got[2], want[2], atol=0.05 * float(want[2].abs().max()), rtol=0)
    with pytest.raises(ValueError, match="quantized drafter"):
        q.save(tmp_path / "again")
    sp = SamplingParams(max_new_tokens=24)
    plain = list(generate(target, prompt, sp))
    assert list(generate(target, prompt, sp, drafter=src, spec=SpecParams(draft_len=4))) == plain
