"""`mtpdraft export --format gemma4-assistant`: drafters in transformers' official layout.

Two drafters are exported: an mtpdraft MTPDrafter (converted: norm offset, layer
scalar, sliding window, query position folded into q_proj) and an
official-convention drafter made by `new_gemma4_assistant` (written as it is).
Without the transformers 5.10.4 reference (MTPDRAFT_TF_REFERENCE, see
test_gemma4.py) we check that the export loads back through `make_drafter` and
drafts the same tokens as the drafter it came from; with it, that transformers'
Gemma4AssistantForCausalLM loads it with no missing tensor, drafts the same tokens
in the first round, and that its assisted generation equals its plain greedy
output and ours.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from mtpdraft.cli import main
from mtpdraft.config import SamplingParams, SpecParams
from mtpdraft.decoding import generate
from mtpdraft.drafters import MTPConfig, MTPDrafter, make_drafter
from mtpdraft.drafters.export import new_gemma4_assistant, to_gemma4_assistant
from mtpdraft.drafters.gemma4_assistant import is_gemma4_assistant
from mtpdraft.models import load_model_dir

transformers = pytest.importorskip("transformers")

from test_gemma4 import COMMON, LAYER_TYPES, V, randomize, reference_command  # noqa: E402

TARGETS = {
    # head_dim equal in both layer types: an MTPDrafter (one head_dim) can draft for it
    "uniform": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=6, layer_types=LAYER_TYPES,
                    hidden_size_per_layer_input=0, vocab_size_per_layer_input=V, final_logit_softcapping=30.0,
                    **(COMMON | dict(global_head_dim=16))),
    # Gemma 4 edge layout: bigger full-layer head_dim, per-layer inputs, KV-shared layers
    "edge": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=6, layer_types=LAYER_TYPES,
                 hidden_size_per_layer_input=8, vocab_size_per_layer_input=V, num_kv_shared_layers=2,
                 final_logit_softcapping=30.0, **COMMON),
}
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_centroids=16,
             centroid_intermediate_top_k=4)
PROMPT = torch.randint(3, V, (20,), generator=torch.Generator().manual_seed(5)).tolist()
N_NEW, K = 24, 3


def perturb_norms(d, seed: int, symmetric_q_norm: bool = True):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in d.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
                if symmetric_q_norm and n.endswith("q_norm.weight"):
                    half = p.shape[0] // 2
                    p[half:] = p[:half]
    return d


def mtp_drafter(target, seed=0, **kw) -> MTPDrafter:
    """An mtpdraft-convention drafter (random; norms perturbed, q_norm pair-symmetric)."""
    cfg = MTPConfig.for_target(target, **(SMALL | dict(layer_types=["sliding_attention", "full_attention"]) | kw))
    return perturb_norms(MTPDrafter.random(cfg, seed=seed, std=0.1), seed)


def official_drafter(target, seed=1):
    d = new_gemma4_assistant(target, **SMALL, std=0.05, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in d.named_parameters():
            if n.endswith("layer_scalar"):
                p.fill_(0.9)
        d.masked_embedding.token_ordering.copy_(torch.randperm(V, generator=g))
    return perturb_norms(d, seed, symmetric_q_norm=False)


class Recorder:
    """Wraps a drafter and keeps every draft it proposes."""

    def __init__(self, inner):
        self.inner, self.drafts = inner, []

    def propose(self, ctx, k):
        d = self.inner.propose(ctx, k)
        self.drafts.append(list(d.tokens))
        return d

    def observe(self, accepted, proposed):
        self.inner.observe(accepted, proposed)


def run(target, drafter=None):
    rec = Recorder(drafter) if drafter is not None else None
    out = list(generate(target, PROMPT, SamplingParams(max_new_tokens=N_NEW), drafter=rec,
                        spec=SpecParams(draft_len=K)))
    return out, (rec.drafts if rec else None)


def export_cli(drafter_dir: Path, target_dir: Path, out: Path) -> Path:
    rc = main(["export", str(drafter_dir), "--format", "gemma4-assistant", "--target", str(target_dir),
               "--out", str(out)])
    assert rc == 0
    assert is_gemma4_assistant(out)
    return out


# -- without the reference: targets built with the installed transformers -------------------

@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    out = {}
    for name, kw in TARGETS.items():
        torch.manual_seed(0)  # transformers initializes from the global RNG: the same targets in any test order
        hf = randomize(transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**kw)).eval())
        path = tmp_path_factory.mktemp(f"target_{name}")
        hf.save_pretrained(path)
        out[name] = path
    return out


def test_converted_drafter_drafts_what_ours_drafts(targets, tmp_path):
    target = load_model_dir(targets["uniform"], "fp32")
    ours = mtp_drafter(target)
    ours.save(tmp_path / "ours")
    out = export_cli(tmp_path / "ours", targets["uniform"], tmp_path / "exported")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["sliding_window"] == COMMON["sliding_window"] - 1  # W - 1 + 1 keys = our W keys
    plain, _ = run(target)
    spec_ours, drafts_ours = run(target, make_drafter(str(tmp_path / "ours"), target))
    spec_exp, drafts_exp = run(target, make_drafter(str(out), target))
    assert spec_ours == spec_exp == plain
    assert drafts_exp == drafts_ours
    # and step by step, the logits agree to float rounding (the query shift is folded into q_proj)
    exp = to_gemma4_assistant(ours, target)
    cache = target.new_cache(1, 64)
    o = target.prefill(torch.tensor([PROMPT]), cache)
    tok, pos = o.logits[0, -1:].argmax(-1), torch.tensor([[cache.lengths[0] - 1]])
    h1 = h2 = o.hidden[:, -1]
    for _ in range(K):
        i1, l1, h1 = ours.step(target, tok, h1, pos, ours.sources(target, cache))
        i2, l2, h2 = exp.step(target, tok, h2, pos, exp.sources(target, cache))
        assert torch.equal(i1, i2)
        # softcapped logits (|l| <= 30) after two fp32 layers summed in another order: 1e-4 is rounding,
        # a wrong fold moves logits by ~0.1
        torch.testing.assert_close(l2, l1, rtol=0, atol=1e-4)
        tok = i1[0, l1[0].argmax()].view(1)


def test_official_convention_drafter_saves_and_exports(targets, tmp_path):
    target = load_model_dir(targets["edge"], "fp32")
    d = official_drafter(target)
    d.save(tmp_path / "trained")  # a Gemma4AssistantDrafter saves the official layout itself
    assert is_gemma4_assistant(tmp_path / "trained")
    out = export_cli(tmp_path / "trained", targets["edge"], tmp_path / "exported")
    plain, _ = run(target)
    spec_a, drafts_a = run(target, make_drafter(str(tmp_path / "trained"), target))
    spec_b, drafts_b = run(target, make_drafter(str(out), target))
    assert spec_a == spec_b == plain
    assert drafts_a == drafts_b and any(drafts_a)


def test_export_refusals_name_the_difference(targets, tmp_path):
    uniform = load_model_dir(targets["uniform"], "fp32")
    edge = load_model_dir(targets["edge"], "fp32")
    # query position: asymmetric q_norm weights cannot absorb the one-position shift
    d = perturb_norms(mtp_drafter(uniform), 3, symmetric_q_norm=False)
    with pytest.raises(ValueError, match="query RoPE position"):
        to_gemma4_assistant(d, uniform)
    with pytest.raises(ValueError, match="last layer is sliding_attention"):
        to_gemma4_assistant(mtp_drafter(uniform, layer_types=["full_attention", "sliding_attention"]), uniform)
    with pytest.raises(ValueError, match="tie_output_to_target"):
        to_gemma4_assistant(mtp_drafter(uniform, tie_output_to_target=True), uniform)
    with pytest.raises(ValueError, match="input_embed_scale"):
        to_gemma4_assistant(mtp_drafter(uniform, input_embed_scale=2.0), uniform)
    # the edge target's full layers have head_dim 32; an MTPDrafter's queries have one head_dim (16)
    with pytest.raises(ValueError, match="head_dim"):
        to_gemma4_assistant(mtp_drafter(edge), edge)
    # widths and vocabulary, through the CLI (exit code 2 and the message)
    narrow = dict(TARGETS["uniform"], hidden_size=48)
    hf = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**narrow)).eval()
    hf.save_pretrained(tmp_path / "narrow")
    mtp_drafter(uniform).save(tmp_path / "d")
    assert main(["export", str(tmp_path / "d"), "--target", str(tmp_path / "narrow"),
                 "--out", str(tmp_path / "o")]) == 2
    with pytest.raises(ValueError, match="hidden size"):
        to_gemma4_assistant(mtp_drafter(uniform), load_model_dir(tmp_path / "narrow", "fp32"))
    other_vocab = MTPDrafter.random(MTPConfig(**(dict(backbone_hidden_size=64, vocab_size=2 * V, head_dim=16,
                                                      num_key_value_heads=2, layer_types=["full_attention"]) | SMALL)))
    with pytest.raises(ValueError, match="vocabulary"):
        to_gemma4_assistant(other_vocab, uniform)
    with pytest.raises(ValueError, match="backbone_hidden_size|hidden size"):
        to_gemma4_assistant(official_drafter(edge), load_model_dir(tmp_path / "narrow", "fp32"))


def test_export_needs_a_gemma4_target(tmp_path, tiny_dirs):
    llama = load_model_dir(tiny_dirs["llama"], "fp32")
    d = MTPDrafter.random(MTPConfig.for_target(llama, **SMALL, layer_types=["full_attention"]))
    with pytest.raises(ValueError, match="needs a Gemma 4 target"):
        to_gemma4_assistant(d, llama)
    d.save(tmp_path / "d")
    assert main(["export", str(tmp_path / "d"), "--target", str(tiny_dirs["llama"]), "--out", str(tmp_path / "o")]) == 2


# -- with the reference: transformers 5.10.4 loads and runs the exports ----------------------

BUILD = r"""
import json, sys, torch
from transformers import Gemma4TextConfig, Gemma4ForCausalLM
out, targets = sys.argv[1], json.loads(sys.argv[2])
for name, kw in targets.items():
    torch.manual_seed(0)
    m = Gemma4ForCausalLM(Gemma4TextConfig(**kw)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.add_(torch.randn_like(p) * (0.05 if p.ndim == 1 else 0.02))
    m.save_pretrained(f"{out}/target_{name}")
"""

RUN = r"""
import json, sys, torch, transformers
from transformers import Gemma4ForCausalLM, Gemma4AssistantForCausalLM
out, pairs, prompt = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
n_new, k = int(sys.argv[4]), int(sys.argv[5])
res = {"version": transformers.__version__}
ids = torch.tensor([prompt])
L = ids.shape[1]
for name, (tdir, adir) in pairs.items():
    target = Gemma4ForCausalLM.from_pretrained(tdir).eval()
    asst, info = Gemma4AssistantForCausalLM.from_pretrained(adir, output_loading_info=True)
    asst.eval()
    with torch.no_grad():
        o = target(ids, use_cache=True, output_hidden_states=True, return_shared_kv_states=True)
        tok, h, steps = o.logits[:, -1:].argmax(-1), o.hidden_states[-1][:, -1:], []
        for _ in range(k):  # the first round after prefill, as the candidate generator drafts it
            e = target.get_input_embeddings()(tok)
            ao = asst(inputs_embeds=torch.cat([e, h], -1), attention_mask=torch.ones(1, L + 1, dtype=torch.long),
                      position_ids=torch.tensor([[L]]), shared_kv_states=o.shared_kv_states, use_cache=False)
            steps.append(ao.logits[0, 0])
            tok, h = ao.logits.argmax(-1), ao.last_hidden_state
        plain = target.generate(ids, max_new_tokens=n_new, do_sample=False)
        spec = target.generate(ids, max_new_tokens=n_new, do_sample=False, assistant_model=asst)
    res[name] = dict(steps=torch.stack(steps), plain=plain[0, L:].tolist(), spec=spec[0, L:].tolist(),
                     info={kk: sorted(map(str, v)) for kk, v in info.items()})
torch.save(res, out + "/ref.pt")
"""


def _ref(script, *args):
    exe, env = reference_command()
    r = subprocess.run(exe + ["-c", script, *map(str, args)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"reference run failed:\n{r.stderr[-3000:]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    if reference_command() is None:
        pytest.skip("set MTPDRAFT_TF_REFERENCE to a transformers 5.10.4 python (or a PYTHONPATH dir holding it): "
                    "transformers 5.23 cannot build Gemma4AssistantForCausalLM")
    root = tmp_path_factory.mktemp("export_ref")
    _ref(BUILD, root, json.dumps(TARGETS))
    tdirs = {name: root / f"target_{name}" for name in TARGETS}
    uniform = load_model_dir(tdirs["uniform"], "fp32")
    edge = load_model_dir(tdirs["edge"], "fp32")
    mtp_drafter(uniform).save(root / "mtp")
    official_drafter(edge).save(root / "official")
    outs = {"mtp": export_cli(root / "mtp", tdirs["uniform"], root / "mtp_exported"),
            "official": export_cli(root / "official", tdirs["edge"], root / "official_exported")}
    pairs = {"mtp": (str(tdirs["uniform"]), str(outs["mtp"])), "official": (str(tdirs["edge"]), str(outs["official"]))}
    _ref(RUN, root, json.dumps(pairs), json.dumps(PROMPT), N_NEW, K)
    return root, {"mtp": uniform, "official": edge}, outs, torch.load(root / "ref.pt")


@pytest.mark.parametrize("name", ["mtp", "official"])
def test_transformers_runs_the_export_losslessly_and_as_we_do(reference, name):
    root, targets, outs, ref = reference
    r, target = ref[name], targets[name]
    assert ref["version"].startswith("5.10")
    assert not r["info"]["missing_keys"] and not r["info"]["unexpected_keys"], r["info"]
    assert not r["info"].get("mismatched_keys"), r["info"]
    assert r["spec"] == r["plain"]  # transformers' assisted generation with the export is lossless
    exported = make_drafter(str(outs[name]), target)
    plain, _ = run(target)
    spec, drafts = run(target, exported)
    assert plain == r["plain"] and spec == plain
    # first round after the prefill: transformers' draft tokens == ours, logits to 1e-4
    first = [int(s.argmax()) for s in r["steps"]]
    assert drafts[0] == first
    if name == "mtp":  # == the drafter it was converted from, every round
        _, drafts_src = run(target, make_drafter(str(root / "mtp"), target))
        assert drafts_src == drafts
    cache = target.new_cache(1, 64)
    o = target.prefill(torch.tensor([PROMPT]), cache)
    tok, h, pos = o.logits[0, -1:].argmax(-1), o.hidden[:, -1], torch.tensor([[cache.lengths[0] - 1]])
    d = exported.drafter
    for i in range(K):
        sel, logits, h = d.step(target, tok, h, pos, d.sources(target, cache))
        rs = r["steps"][i]
        assert set(sel[0].tolist()) == set((rs > rs.min()).nonzero()[:, 0].tolist())
        torch.testing.assert_close(logits[0], rs[sel[0]], rtol=0, atol=1e-4)
        tok = sel[0, logits[0].argmax()].view(1)
