"""Drafter training: the training forward is the inference drafting step, `train
--quick` runs end to end and learns, the combined drafter stays lossless."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mtpdraft import load
from mtpdraft.config import DEFAULT_DRAFT_LEN, SamplingParams, SpecParams, Stats
from mtpdraft.decoding.engine import generate
from mtpdraft.drafters import NgramDrafter, make_drafter
from mtpdraft.drafters.combined import CombinedDrafter, draft_len_for, for_request
from mtpdraft.testing import tiny_model_dir
from mtpdraft.train.features import compute_features
from mtpdraft.train.model import balanced_clusters, head_loss, cluster_of, new_drafter, source_layers, unrolled


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tiny_model_dir(tmp_path_factory.mktemp("tiny_train") / "gemma3", "gemma3_text")
    model, tok = load(str(d), "fp32")
    return d, model, tok


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is faster and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomized(model, layer_types, seed=1):
    d = new_drafter(model, dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, layer_types=layer_types,
                                num_centroids=32, centroid_intermediate_top_k=8, tie_output_to_target=True), 0)
    g = torch.Generator().manual_seed(seed)
    for _, p in d.named_parameters():  # large enough that every layer matters
        p.data = torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1)
    return d


@pytest.mark.parametrize("layer_types", [["full_attention"], ["sliding_attention", "full_attention"]])
def test_training_forward_equals_inference_steps(tiny, one_thread, layer_types):
    _, model, _ = tiny
    dr = _randomized(model, layer_types)
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(4, 300, (30,), generator=g).tolist()  # longer than the sliding window (8)
    layers = sorted(set(source_layers(layer_types, model)))
    assert dr.source_layers(model) == source_layers(layer_types, model)
    f = compute_features(model, [dict(tokens=seq, prompt_len=1)], layers, dtype=torch.float32)
    b = f.batch([0])
    kv = [b["kv"][layers.index(i)] for i in dr.source_layers(model)]
    k = 3
    for p in dr.parameters():
        p.requires_grad_(p.is_floating_point())
    outs = unrolled(dr, model, b["tokens"], b["hidden"], kv, k)  # autograd on: the differentiable path
    assert outs[-1][1].requires_grad
    for p in dr.parameters():
        p.requires_grad_(False)
    outs = [(x.detach(), h.detach()) for x, h in outs]
    for p in [0, 4, 9, 17, 26]:  # drafting as the engine does it: inference mode, the runtime's kernels
        _inference_steps_match(model, dr, seq, outs, p, k)


@pytest.mark.parametrize("layer_types", [["full_attention", "full_attention"], ["sliding_attention", "full_attention"]])
def test_batch_loss_gives_each_drafter_layer_its_own_source_layer(tiny, one_thread, monkeypatch, layer_types):
    """Features hold each target layer's K/V once, in layer order; drafter layers that share a
    target layer, or list them in another order, each get their source layer's K/V."""
    import mtpdraft.train.train as T

    _, model, _ = tiny
    dr = _randomized(model, layer_types)
    layers = sorted(set(source_layers(layer_types, model)))
    assert len(layers) < len(layer_types) or layers != source_layers(layer_types, model)  # the cases at issue
    g = torch.Generator().manual_seed(7)
    b = compute_features(model, [dict(tokens=torch.randint(4, 300, (20,), generator=g).tolist(), prompt_len=2)],
                         layers, dtype=torch.float32).batch([0])
    seen = []
    monkeypatch.setattr(T, "unrolled", lambda d, t, seq, hid, kv, k: seen.append(kv) or unrolled(d, t, seq, hid, kv, k))
    loss, _ = T.batch_loss(dr, model, b, T.TrainConfig(draft_steps=2, extra_clusters=2), cluster_of(dr))
    want = [b["kv"][layers.index(i)] for i in source_layers(layer_types, model)]
    assert len(seen[0]) == len(layer_types) and all(a is w for a, w in zip(seen[0], want))
    assert torch.isfinite(loss)


@torch.inference_mode()
def _inference_steps_match(model, dr, seq, outs, p, k):
    """Drafting steps from position p as MTPDraftSource runs them equal the training forward's."""
    cache = model.new_cache(1, 64, 64)
    out = model(torch.tensor([seq[:p + 1]]), cache, logits="none")
    h = out.hidden[0, -1][None]
    srcs, pos = dr.sources(model, cache), torch.tensor([[p]])
    for j in range(1, k + 1):
        if p + j >= len(seq):
            break
        ids, logits, h = dr.step(model, torch.tensor([seq[p + j]]), h, pos, srcs)
        x_t, h_t = outs[j - 1]
        torch.testing.assert_close(h[0], h_t[0, p], atol=1e-4, rtol=1e-4)
        # the same clustered head on the training state picks the same token
        top = dr.masked_embedding.centroids(h_t[0, p][None]).topk(8, -1).indices
        ids_t = dr.masked_embedding.token_ordering.view(32, -1)[top].flatten(1)
        assert torch.equal(ids, ids_t)


def test_balanced_clusters_and_head_loss(tiny, one_thread):
    _, model, _ = tiny
    order = balanced_clusters(model.head_weight, 32)
    assert sorted(order.tolist()) == list(range(model.vocab_size))  # a permutation: equal-size clusters
    dr = _randomized(model, ["full_attention"])
    for p in dr.parameters():
        p.requires_grad_(True)
    y = torch.randn(20, model.args.hidden_size)
    labels = torch.randint(0, model.vocab_size, (20,))
    loss, correct = head_loss(dr, model, y, labels, cluster_of(dr), extra_clusters=2)
    loss.backward()
    assert torch.isfinite(loss) and correct.shape == (20,)
    assert dr.masked_embedding.centroids.weight.grad is not None


def test_distillation_term_is_the_cross_entropy_to_the_targets_candidates(tiny, one_thread):
    """distill_weight 1, no centroid term: the loss is the cross-entropy from the target's
    distribution over the candidate tokens, so its gradient vanishes where the drafter's
    state equals the target's and the loss there is p's entropy, below any other state's."""
    _, model, _ = tiny
    dr = _randomized(model, ["full_attention"])
    labels = torch.randint(0, model.vocab_size, (12,))
    teacher = torch.randn(12, model.args.hidden_size)
    kw = dict(extra_clusters=2, centroid_weight=0.0, distill_weight=1.0)

    def loss_at(y):
        y = y.clone().requires_grad_(True)
        loss, _ = head_loss(dr, model, y, labels, cluster_of(dr), teacher=teacher, **kw)
        (g,) = torch.autograd.grad(loss, y)
        return float(loss.detach()), float(g.abs().max())

    at_teacher, g = loss_at(teacher)
    elsewhere, g2 = loss_at(teacher + 0.5 * torch.randn(teacher.shape, generator=torch.Generator().manual_seed(1)))
    assert g < 1e-4 and g2 > 100 * g and elsewhere > at_teacher + 1e-3, (g, g2, at_teacher, elsewhere)
    hard, _ = head_loss(dr, model, teacher, labels, cluster_of(dr), extra_clusters=2, centroid_weight=0.0)
    half, _ = head_loss(dr, model, teacher, labels, cluster_of(dr), teacher=teacher, extra_clusters=2,
                        centroid_weight=0.0, distill_weight=0.5)
    assert abs(float(half) - 0.5 * (float(hard) + at_teacher)) < 1e-5


def test_training_can_start_from_an_existing_drafter(tiny, tmp_path, one_thread):
    """init_from: training starts from that drafter's weights and architecture (the
    features follow its layers); a drafter made for another target is refused."""
    from mtpdraft.train.train import TrainConfig, initial_drafter, run_layer_types, save_drafter

    _, model, _ = tiny
    start = _randomized(model, ["sliding_attention", "full_attention"])
    save_drafter(start, tmp_path / "start")
    cfg = TrainConfig(init_from=str(tmp_path / "start"), layer_types=("full_attention",), hidden_size=64)
    assert run_layer_types(cfg) == ["sliding_attention", "full_attention"]
    d = initial_drafter(cfg, model)
    from mtpdraft.drafters.mtp import MTPDrafter

    ref = MTPDrafter.load(tmp_path / "start")
    assert d.config == ref.config and d.config.hidden_size == 32
    for k, v in ref.state_dict().items():
        assert torch.equal(d.state_dict()[k], v), k
        if v.is_floating_point():
            assert d.state_dict()[k].dtype == torch.float32
    # the stored bf16 weights, not a fresh initialisation
    assert torch.equal(d.model.layers[0].self_attn.q_proj.weight,
                       start.model.layers[0].self_attn.q_proj.weight.to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="tie_output_to_target"):
        initial_drafter(TrainConfig(init_from=str(tmp_path / "start"), tie_output_to_target=False), model)
    other = json.loads((tmp_path / "start" / "config.json").read_text())
    other["num_key_value_heads"] *= 2  # no weight's shape depends on it: the target check catches it
    (tmp_path / "start" / "config.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="does not match the target: KV heads"):
        initial_drafter(cfg, model)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        run_layer_types(TrainConfig(init_from=str(tmp_path / "missing")))


def test_at_draft_lens_names_each_length():
    from mtpdraft.train.evaluate import at_draft_lens

    plain, mtp = (lambda: None), (lambda: "mtp")
    confs, lens = at_draft_lens({"plain": plain, "mtp": mtp}, [2, 8])
    assert confs == {"plain": plain, "mtp k=2": mtp, "mtp k=8": mtp} and lens == {"mtp k=2": 2, "mtp k=8": 8}
    confs, lens = at_draft_lens({"mtp": mtp}, [], fixed=())
    assert confs == lens == {}


def test_train_config_refuses_bad_draft_lengths():
    from mtpdraft.train.train import TrainConfig

    for bad in ({"select_draft_lens": (2, 0)}, {"select_draft_lens": (40,)}, {"draft_len": 2.5},
                {"select_draft_lens": (True,)}):
        with pytest.raises(ValueError, match="draft_len and select_draft_lens must be integers in 1..32"):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="select_draft_lens must be a list of draft lengths, got 8"):
        TrainConfig(select_draft_lens=8)
    assert TrainConfig(select_draft_lens=(1, 32)).select_draft_lens == (1, 32)


def test_bf16_training_precision_is_the_fp32_loss_with_fp32_weights(tiny, one_thread):
    """train_precision bf16: the training forward's matmuls run in bf16 (the loss moves by
    rounding only), while the loss, the weights and their gradients stay fp32; fp32 is
    untouched by autocast. Unknown precisions are refused before any work."""
    from mtpdraft.train.train import TrainConfig, batch_loss, train_autocast

    with pytest.raises(ValueError, match="train_precision must be auto, bf16 or fp32, got 'fp16'"):
        TrainConfig(train_precision="fp16")
    _, model, _ = tiny
    dr = _randomized(model, ["full_attention"])
    for p in dr.parameters():
        p.requires_grad_(p.is_floating_point())
    g = torch.Generator().manual_seed(5)
    seqs = [dict(tokens=torch.randint(4, 300, (n,), generator=g).tolist(), prompt_len=2) for n in (24, 17)]
    layers = sorted(set(dr.source_layers(model)))
    b = compute_features(model, seqs, layers).batch([0, 1])  # bf16 features, as a run stores them
    cfg = TrainConfig(draft_steps=3, distill_weight=0.5, extra_clusters=2)
    res = {}
    for prec in ("fp32", "bf16"):
        dr.zero_grad(set_to_none=True)
        with train_autocast(TrainConfig(train_precision=prec)):
            loss, _ = batch_loss(dr, model, b, cfg, cluster_of(dr))
        loss.backward()
        grads = {n: p.grad for n, p in dr.named_parameters() if p.requires_grad}
        assert loss.dtype == torch.float32 and all(v is not None and v.dtype == torch.float32 for v in grads.values())
        res[prec] = float(loss.detach()), torch.cat([v.flatten() for v in grads.values()])
    (l32, g32), (l16, g16) = res["fp32"], res["bf16"]
    assert l16 != l32 and abs(l16 - l32) < 0.02 * abs(l32), (l16, l32)  # bf16 ran, and only rounded
    assert float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)) > 0.98
    assert all(p.dtype == torch.float32 for p in dr.parameters() if p.is_floating_point())


def _tau(model, prompts, drafter_factory, n=32):
    st = Stats()
    outs = []
    for ids in prompts:
        s = Stats()
        outs.append(list(generate(model, ids, SamplingParams(max_new_tokens=n), drafter=drafter_factory(),
                                  spec=SpecParams(draft_len=4), stats=s)))
        st.decode_tokens += s.decode_tokens
        st.cycles += s.cycles
    return st.mean_accepted_tokens, outs


def test_train_quick_end_to_end(tiny, tmp_path, one_thread, monkeypatch):
    from mtpdraft.cli import main

    path, model, tok = tiny
    out = tmp_path / "run"
    assert main(["train", "--model", str(path), "--dtype", "fp32", "--out", str(out), "--quick"]) == 0
    for f in ("data/sequences.jsonl", "features/train.pt", "features/val.pt", "drafter/config.json",
              "drafter/model.safetensors", "untrained/config.json", "select.json", "eval.json", "train_log.json"):
        assert (out / f).exists(), f
    split = json.loads((out / "split.json").read_text())
    sel, ev = (json.loads((out / f).read_text()) for f in ("select.json", "eval.json"))
    # choices on the validation prompts, figures on the eval prompts: three disjoint sets
    assert sel["prompt_ids"] == split["validation"][:len(sel["prompt_ids"])] and sel["prompt_ids"]
    assert ev["prompt_ids"] == split["eval"][:len(ev["prompt_ids"])] and ev["prompt_ids"]
    assert not set(split["train"]) & set(split["validation"]) and not set(split["train"] + split["validation"]) & set(
        split["eval"])
    from mtpdraft.train.train import chosen_variant

    assert set(ev["configs"]) == {"plain", "mtp", "ngram", chosen_variant(sel)}
    assert {"mtp", "ngram", "combined", "fallback:1", "mtp_untrained"} <= set(sel["configs"])
    # every drafting variant also ran at the other selection length, in the same rotation
    assert {"mtp k=2", "ngram k=2", "combined k=2", "fallback:1 k=2"} <= set(sel["configs"])
    assert sel["configs"]["combined k=2"]["draft_len"] == 2 and "mtp_untrained k=2" not in sel["configs"]
    assert len(sel["configs"]["combined k=2"]["proposed_by_position"]) <= 2
    for res in (sel, ev):
        for name, r in res["configs"].items():
            if name != "plain":
                assert r["greedy_equal_to_plain"].split("/")[0] == r["greedy_equal_to_plain"].split("/")[1]
    seqs = [json.loads(line) for line in (out / "data/sequences.jsonl").read_text().splitlines()]
    sources = {s["source"].split(":")[0] for s in seqs}
    assert {"val/" + i for i in split["validation"]} <= sources and not sources & set(split["eval"])
    # the data as a datastore drafter: the training sequences only
    from mtpdraft.drafters.datastore import Datastore

    store = Datastore.load(out / "datastore.safetensors")
    assert store.num_sequences == sum(not s["source"].startswith("val/") for s in seqs) > 0
    trained = make_drafter(str(out / "drafter"), model)
    untrained = make_drafter(str(out / "untrained"), model)
    # tau on the training distribution: the training prompts' greedy continuations
    from mtpdraft.train.data import load_prompts

    by_id = {p["id"]: p for p in load_prompts()}
    prompts = [tok(by_id[i]["prompt"]).input_ids[:96] for i in split["train"][:6]]
    tau_after, outs_after = _tau(model, prompts, lambda: trained)
    tau_before, outs_before = _tau(model, prompts, lambda: untrained)
    _, outs_plain = _tau(model, prompts, lambda: None)
    assert outs_after == outs_plain == outs_before
    assert tau_after > tau_before, (tau_after, tau_before)
    # resuming a finished run redoes nothing
    assert main(["train", "--model", str(path), "--dtype", "fp32", "--out", str(out), "--quick"]) == 0
    # the centroid top-k tuning also measured how often the label's cluster is searched: a
    # ceiling on the first token's accuracy, rising with the clusters searched
    tuning = json.loads((out / "train_log.json").read_text())["top_k_tuning"]
    recall, acc1 = tuning["val_step1_cluster_recall_by_top_k"], tuning["val_step1_acc_by_top_k"]
    assert recall.keys() == acc1.keys() == tuning["val_tau_by_top_k"].keys() and len(recall) >= 2
    assert all(0 < acc1[k] <= recall[k] <= 1 for k in recall)
    assert [recall[k] for k in sorted(recall, key=int)] == sorted(recall.values())
    # the top-k itself was chosen in the real loop: MTP alone at each candidate against plain
    # decoding on the validation prompts (exact at every k), the fastest written to the config
    stk = json.loads((out / "select_top_k.json").read_text())
    assert stk["prompt_ids"] == sel["prompt_ids"] and stk["candidates"] == sorted(map(int, recall))
    speeds = {k: stk["configs"][f"mtp top-k={k}"]["decode_tokens_per_s"] for k in stk["candidates"]}
    assert all(stk["configs"][f"mtp top-k={k}"]["greedy_equal_to_plain"] == f"{len(sel['prompt_ids'])}/"
               f"{len(sel['prompt_ids'])}" for k in speeds)
    chosen = json.loads((out / "drafter" / "config.json").read_text())["centroid_intermediate_top_k"]
    assert stk["chosen"] == chosen == max(speeds, key=speeds.get)
    # shipping decides on the validation figures (select.json), and the card reports the eval ones
    from mtpdraft.train.train import TrainConfig, ship

    cfg = TrainConfig.quick_config(model=str(path), dtype="fp32", out=str(out))

    def decide(speeds: dict, dest: str):
        doctored = json.loads(json.dumps(sel))
        doctored["configs"]["mtp"]["tau"] = doctored["configs"]["mtp_untrained"]["tau"] + 1
        for n, r in doctored["configs"].items():
            r["decode_tokens_per_s"] = speeds.get(n, 1.0)
        (out / "select.json").write_text(json.dumps(doctored))
        return ship(cfg, tmp_path / dest)

    assert not decide({"ngram": 9.0, "combined": 5.0}, "none") and not (tmp_path / "none").exists()
    assert not decide({"ngram k=2": 9.0, "combined": 5.0}, "none") and not (tmp_path / "none").exists()
    # plain decoding is a candidate too: nothing to ship when it beats every drafter
    assert not decide({"plain": 9.0, "ngram": 5.0, "combined": 6.0}, "none") and not (tmp_path / "none").exists()
    assert decide({"ngram": 5.0, "combined": 9.0, "mtp": 7.0}, "comb")
    auto = json.loads((tmp_path / "comb" / "auto.json").read_text())
    assert (auto["drafter"], auto["draft_len"]) == ("combined", cfg.draft_len)
    assert decide({"ngram": 5.0, "combined": 6.0, "combined k=2": 9.0, "mtp": 7.0}, "comb2")
    auto = json.loads((tmp_path / "comb2" / "auto.json").read_text())
    assert (auto["drafter"], auto["draft_len"], auto["chosen_from"]) == ("combined", 2, "combined k=2")
    assert "(combined k=2) and its draft length (of 2, 6)" in (tmp_path / "comb2" / "README.md").read_text()
    card = (tmp_path / "comb" / "README.md").read_text()
    assert "eval prompts" in card and f"{ev['configs']['mtp']['tau']:.2f}" in card
    k = str(json.loads((out / "drafter" / "config.json").read_text())["centroid_intermediate_top_k"])
    assert f"its label's cluster is among them {recall[k]:.0%} of the time" in card
    assert "Chosen in the real loop, MTP alone on" in card and f"{k}: {stk['configs'][f'mtp top-k={k}']['speedup_vs_plain']:.2f}x" in card
    # the data stage counted what the target wrote (the continuations, not the prompts)
    done = json.loads((out / "data" / "DONE.json").read_text())
    assert done["target_tokens"] == sum(len(s["tokens"]) - s["prompt_len"] for s in seqs) > 0
    assert f"{done['target_tokens']:,} of them written by the target at" in card
    assert decide({"ngram": 5.0, "combined": 6.0, "mtp": 9.0}, "alone")
    assert json.loads((tmp_path / "alone" / "auto.json").read_text())["drafter"] == "mtp"
    assert isinstance(make_drafter(str(tmp_path / "alone"), model), type(trained))
    assert decide({"ngram": 5.0, "combined": 6.0, "mtp": 7.0, "fallback:1": 8.0}, "fallback")
    auto = json.loads((tmp_path / "fallback" / "auto.json").read_text())
    assert (auto["drafter"], auto["min_match"], auto["mtp_len"]) == ("combined", 1, 1)
    import mtpdraft.drafters as D

    monkeypatch.setattr(D, "shipped_drafter_dir", lambda name: tmp_path / "fallback")
    fb = make_drafter("auto", model, "tiny")
    fb = getattr(fb, "greedy", fb)  # a sampled variant of its own may wrap it
    assert isinstance(fb, CombinedDrafter) and (fb.min_match, fb.mtp_len) == (1, 1)
    monkeypatch.undo()
    # sampled requests: their own choice, made on the validation prompts at the set temperature
    sel_t, ev_t = (json.loads((out / f).read_text()) for f in ("select_sampled.json", "eval_sampled.json"))
    assert sel_t["temperature"] == ev_t["temperature"] == cfg.sampled_temperature > 0
    assert sel_t["prompt_ids"] == sel["prompt_ids"] and ev_t["prompt_ids"] == ev["prompt_ids"]
    assert "mtp_untrained" not in sel_t["configs"] and "greedy_equal_to_plain" not in sel_t["configs"]["mtp"]
    doctored = json.loads(json.dumps(sel_t))
    for n, r in doctored["configs"].items():
        r["decode_tokens_per_s"] = 9.0 if n == "ngram" else 1.0
    (out / "select_sampled.json").write_text(json.dumps(doctored))
    assert decide({"ngram": 5.0, "combined": 9.0, "mtp": 7.0}, "both")
    auto = json.loads((tmp_path / "both" / "auto.json").read_text())
    assert auto["drafter"] == "combined" and auto["sampled"]["drafter"] == "ngram"
    assert f"temperature {cfg.sampled_temperature}" in (tmp_path / "both" / "README.md").read_text()
    for n, r in doctored["configs"].items():  # sampled: plain decoding fastest -> no draft there
        r["decode_tokens_per_s"] = 9.0 if n == "plain" else 1.0
    (out / "select_sampled.json").write_text(json.dumps(doctored))
    assert decide({"ngram": 5.0, "combined": 9.0, "mtp": 7.0}, "plain_sampled")
    auto = json.loads((tmp_path / "plain_sampled" / "auto.json").read_text())
    assert auto["drafter"] == "combined" and auto["sampled"]["drafter"] == "none"


def test_auto_runs_its_sampled_variant_at_temperature(tiny, one_thread, tmp_path, monkeypatch):
    """auto.json's "sampled" entry: greedy requests get the greedy variant, sampled ones the
    sampled variant (with its draft-length cap); greedy output stays plain decoding's."""
    import shutil

    import mtpdraft.drafters as D
    from mtpdraft.drafters.base import DraftContext
    from mtpdraft.drafters.combined import ByTemperature

    path, model, tok = tiny
    dr = _randomized(model, ["full_attention"])
    dest = tmp_path / "shipped"
    dr.save(dest)
    (dest / "auto.json").write_text(json.dumps({"drafter": "combined", "min_confidence": 0.0, "min_match": 2,
                                                "sampled": {"drafter": "ngram", "draft_len": 2}}))
    monkeypatch.setattr(D, "shipped_drafter_dir", lambda name: dest)
    auto = make_drafter("auto", model, "tiny")
    assert isinstance(auto, ByTemperature) and isinstance(auto.greedy, CombinedDrafter)
    assert isinstance(auto.sampled, NgramDrafter)
    cache = model.new_cache(1, 64, 64)
    toks = [5, 6, 7, 8, 9, 5, 6]
    out = model(torch.tensor([toks[:-1]]), cache, logits="none")
    ctx = DraftContext(toks, out.hidden[0, -1], model, cache, sampling=SamplingParams(temperature=0.7))
    assert auto.propose(ctx, 4).tokens == [7, 8] and auto.last is auto.sampled  # capped at 2
    ctx = DraftContext(toks, out.hidden[0, -1], model, cache, sampling=SamplingParams())
    assert auto.propose(ctx, 4).tokens == [7, 8, 9, 5] and auto.last is auto.greedy
    ids = tok("abcabcabc hello").input_ids
    sp = SamplingParams(max_new_tokens=30)
    assert list(generate(model, ids, sp, drafter=auto, spec=SpecParams(draft_len=4))) == list(generate(model, ids, sp))
    # "none": no draft at that temperature (plain decoding measured fastest there)
    (dest / "auto.json").write_text(json.dumps({"drafter": "combined", "sampled": {"drafter": "none"}}))
    auto = make_drafter("auto", model, "tiny")
    ctx = DraftContext(toks, out.hidden[0, -1], model, cache, sampling=SamplingParams(temperature=0.7))
    assert auto.sampled is None and auto.propose(ctx, 4).tokens == [] and auto.last is None
    auto.observe(0, 0)
    ctx = DraftContext(toks, out.hidden[0, -1], model, cache, sampling=SamplingParams())
    assert auto.propose(ctx, 4).tokens == [7, 8, 9, 5]
    sp_t = SamplingParams(max_new_tokens=30, temperature=0.7, seed=3)
    calls, propose = [], auto.propose
    auto.propose = lambda ctx, k: calls.append(k) or propose(ctx, k)
    assert list(generate(model, ids, sp_t, drafter=auto, spec=SpecParams(draft_len=4))) == \
        list(generate(model, ids, sp_t))  # no draft: the plain sampled path, token for token
    assert not calls  # the request got no drafter at all (not one proposing nothing)
    assert list(generate(model, ids, sp, drafter=auto, spec=SpecParams(draft_len=4))) and calls
    assert for_request(auto, sp_t) is None and for_request(auto, sp) is auto
    # a greedy draft-length cap ("draft_len" beside the greedy variant); without a "sampled"
    # entry the same variant and cap serve sampled requests
    (dest / "auto.json").write_text(json.dumps({"drafter": "combined", "min_confidence": 0.0, "draft_len": 3}))
    auto = make_drafter("auto", model, "tiny")
    assert isinstance(auto, ByTemperature) and auto.greedy is auto.sampled
    assert auto.propose(ctx, 4).tokens == [7, 8, 9]
    ctx = DraftContext(toks, out.hidden[0, -1], model, cache, sampling=SamplingParams(temperature=0.7))
    assert auto.propose(ctx, 4).tokens == [7, 8, 9]
    assert list(generate(model, ids, sp, drafter=auto, spec=SpecParams(draft_len=6))) == list(generate(model, ids, sp))
    # auto's length is the default of a request that sets none, and caps one that sets more
    (dest / "auto.json").write_text(json.dumps({"drafter": "combined", "min_confidence": 0.0, "draft_len": 9,
                                                "sampled": {"drafter": "ngram", "draft_len": 2}}))
    auto = make_drafter("auto", model, "tiny")
    sp_t = SamplingParams(max_new_tokens=30, temperature=0.7, seed=3)
    assert [draft_len_for(auto, sp, k) for k in (None, 4, 12)] == [9, 4, 9]
    assert [draft_len_for(auto, sp_t, k) for k in (None, 1, 6)] == [2, 1, 2]
    assert draft_len_for(None, sp, 5) == 0 and draft_len_for(NgramDrafter(), sp, None) == DEFAULT_DRAFT_LEN
    rep = tok("abc abc abc abc abc abc abc abc abc abc").input_ids
    for spec, longest in ((SpecParams(), 9), (SpecParams(draft_len=3), 3), (SpecParams(draft_len=20), 9)):
        st = Stats()
        assert list(generate(model, rep, sp, drafter=auto, spec=spec, stats=st)) == list(generate(model, rep, sp))
        assert len(st.proposed_by_pos) == longest  # the loop drafts that many (the text repeats)
    for bad in (0, 33, "3", 2.5):
        (dest / "auto.json").write_text(json.dumps({"drafter": "combined", "draft_len": bad}))
        with pytest.raises(ValueError, match="draft_len must be an integer in 1..32"):
            make_drafter("auto", model, "tiny")
    (dest / "auto.json").write_text(json.dumps({"drafter": "combined", "sampled": {"drafter": "ngram", "draft_len": 0}}))
    with pytest.raises(ValueError, match="sampled.draft_len must be an integer in 1..32"):
        make_drafter("auto", model, "tiny")
    (dest / "auto.json").write_text(json.dumps({"drafter": "combined", "sampled": "ngram"}))
    with pytest.raises(ValueError, match='"sampled" must be an object'):
        make_drafter("auto", model, "tiny")
    (dest / "auto.json").write_text(json.dumps({"drafter": "none", "sampled": {"drafter": "none"}}))
    assert make_drafter("auto", model, "tiny") is None
    (dest / "auto.json").write_text(json.dumps({"drafter": "combined", "sampled": {"drafter": "eagle"}}))
    with pytest.raises(ValueError, match="unknown drafter 'eagle'"):
        make_drafter("auto", model, "tiny")
    shutil.rmtree(dest)


def test_combined_drafter_is_lossless(tiny, one_thread):
    _, model, tok = tiny
    dr = _randomized(model, ["full_attention"])
    from mtpdraft.drafters.mtp import MTPDraftSource

    mtp = MTPDraftSource(dr)
    for text in ["abcabcabcabc", "The quick brown fox. The quick brown fox.", "hello world"]:
        ids = tok(text).input_ids
        sp = SamplingParams(max_new_tokens=40)
        plain = list(generate(model, ids, sp))
        comb = CombinedDrafter(mtp, min_match=2)
        st = Stats()
        got = list(generate(model, ids, sp, drafter=comb, spec=SpecParams(draft_len=4), stats=st))
        assert got == plain
        assert comb.rounds["ngram"] + comb.rounds["mtp"] > 0
    # n-gram drafts take precedence on a repeated >= 2-token suffix
    from mtpdraft.drafters.base import DraftContext

    comb = CombinedDrafter(mtp, min_match=2)
    cache = model.new_cache(1, 64, 64)
    toks = [5, 6, 7, 8, 5, 6]
    out = model(torch.tensor([toks[:-1]]), cache, logits="none")
    d = comb.propose(DraftContext(toks, out.hidden[0, -1], model, cache), 3)
    assert d.tokens == [7, 8, 5] and comb.last == "ngram"
    ng = NgramDrafter()
    assert ng.propose(DraftContext(toks, out.hidden[0, -1], model, cache), 3).tokens == [7, 8, 5]
    # mtp_len caps the MTP draft only: a lookup draft keeps its length
    short = CombinedDrafter(mtp, min_match=1, mtp_len=1)
    assert short.propose(DraftContext(toks, out.hidden[0, -1], model, cache), 3).tokens == [7, 8, 5]
    fresh = [9, 10, 11]
    out = model(torch.tensor([fresh[:-1]]), model.new_cache(1, 64, 64), logits="none")
    ctx = DraftContext(fresh, out.hidden[0, -1], model, cache)
    assert len(short.propose(ctx, 3).tokens) == 1 and short.last == "mtp"
    assert len(CombinedDrafter(mtp, min_match=1).propose(ctx, 3).tokens) == 3
    for text in ["abcabcabcabc", "hello world"]:
        ids = tok(text).input_ids
        sp = SamplingParams(max_new_tokens=40)
        got = list(generate(model, ids, sp, drafter=CombinedDrafter(mtp, min_match=1, mtp_len=2),
                            spec=SpecParams(draft_len=4)))
        assert got == list(generate(model, ids, sp))
    with pytest.raises(ValueError, match="mtp_len"):
        CombinedDrafter(mtp, mtp_len=0)


def test_data_only_run_writes_data_and_its_datastore(tiny, tmp_path, one_thread):
    from mtpdraft.cli import main
    from mtpdraft.drafters.datastore import Datastore

    path, model, tok = tiny
    out = tmp_path / "run"
    args = ["train", "--model", str(path), "--dtype", "fp32", "--out", str(out), "--quick", "--data-only"]
    assert main(args + ["--ship", str(tmp_path / "ship")]) == 2  # nothing to ship, refused before any work
    assert not out.exists()
    assert main(args) == 0
    assert (out / "data/sequences.jsonl").exists() and not (out / "features").exists()
    assert set(json.loads((out / "timings.json").read_text())) == {"data"}
    drafter = make_drafter(str(out / "datastore.safetensors"), model)
    assert drafter.store is not None and drafter.mtp is None
    # the same store by the CLI, for the run's own model; another model is refused
    again = tmp_path / "again.safetensors"
    assert main(["datastore", "--run", str(out), "--out", str(again)]) == 0
    assert np.array_equal(Datastore.load(again).tokens, drafter.store.store.tokens)
    assert main(["datastore", "--run", str(out), "--model", "smollm2-135m-instruct", "--out", str(again)]) == 2


def test_batched_data_generation_equals_plain_greedy(tiny, one_thread):
    from mtpdraft.train.data import Job, generate_batch

    _, model, tok = tiny
    prompts = [tok(t).input_ids for t in ["abc", "a longer prompt here", "xyz xyz", "q"]]
    jobs = [Job(p, 20) for p in prompts] + [Job(prompts[0], 12, temperature=1.0, seed=3, sample_first=4)]
    seqs = generate_batch(model, jobs, eos_ids=set())
    for p, s in zip(prompts, seqs):
        assert s == p + list(generate(model, p, SamplingParams(max_new_tokens=20, ignore_eos=True)))
    assert len(seqs[-1]) == len(prompts[0]) + 12
    # two cache rows for five jobs: finished rows leave (the last row moves into the gap)
    # and later jobs take their rows; every sequence is unchanged
    uneven = [Job(p, n) for p, n in zip(prompts, [20, 5, 13, 8])] + [jobs[-1]]
    got = generate_batch(model, uneven, eos_ids=set(), max_rows=2)
    for j, s in zip(uneven[:4], got):
        assert s == j.prompt + list(generate(model, j.prompt, SamplingParams(max_new_tokens=j.new_tokens,
                                                                              ignore_eos=True)))
    assert got[-1] == seqs[-1]  # the sampled row: same seed, same tokens, whichever cache row it had


def test_cluster_dot_matches_a_plain_gather():
    from mtpdraft.train.model import cluster_dot

    g = torch.Generator().manual_seed(0)
    C, per, D, N, M = 16, 8, 12, 30, 3
    ordered = torch.randn(C, per, D, generator=g)
    cand = torch.randint(0, C, (N, M), generator=g)
    y = torch.randn(N, D, generator=g, requires_grad=True)
    out = cluster_dot(y, ordered, cand)
    ref = torch.einsum("nd,nmid->nmi", y, ordered[cand]).reshape(N, M * per)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    up = torch.randn(out.shape, generator=g)
    (gy,) = torch.autograd.grad(out, y, up)
    (gy_ref,) = torch.autograd.grad(ref, y, up)
    torch.testing.assert_close(gy, gy_ref, rtol=1e-5, atol=1e-5)


def test_train_validation_eval_and_bench_prompts_share_no_passage():
    """The prompt sets: training, validation (every choice) and eval (the model card's
    figures), as `mtpdraft train` splits them, and the bench set of README/BENCHMARKS."""
    from mtpdraft.bench.prompts import load_prompts as load_bench
    from mtpdraft.train.data import EXTRA_PROMPTS_FILE, load_prompts, shared_passages, split_sets, training_only
    from mtpdraft.train.train import TrainConfig

    cfg = TrainConfig()
    prompts = load_prompts()
    train, val, evals = split_sets(prompts, cfg.val_prompts_frac, cfg.eval_prompts_frac, cfg.seed)
    bench = [{"id": p.id, "turns": list(p.turns)} for p in load_bench()]
    assert len(train) + len(val) + len(evals) == len(prompts)
    assert len(train) > 3 * len(val) > 0 and len(val) >= cfg.eval_prompts and len(evals) >= cfg.eval_prompts
    assert {p["category"] for p in val} == {p["category"] for p in evals} == {p["category"] for p in prompts}
    assert shared_passages(train, val) == [] and shared_passages(train + val, evals) == []
    assert shared_passages(train + val, bench) == []
    # benchmarks/compare_drafters.py's prompts: unseen by training, validation, eval and bench
    heldout = load_prompts(Path(__file__).parent.parent / "benchmarks" / "heldout_prompts.jsonl")
    assert len(heldout) >= 16 and shared_passages(prompts + bench, heldout) == []
    # the training-only broad set: nothing in common with any held-out set, no reused id
    # (training_only raises otherwise, as `mtpdraft train` would)
    extra = load_prompts(EXTRA_PROMPTS_FILE)
    assert len(extra) >= 500 and training_only(extra, prompts, val + evals + bench + heldout) == extra


def test_extra_prompts_are_training_only_and_refused_when_they_leak():
    from mtpdraft.train.data import training_only

    prompts = [{"id": "a", "prompt": "Describe a quiet harbor town at dawn."},
               {"id": "v", "prompt": "The old mill by the river burned down in the spring of that year."}]
    ok = [{"id": "x1", "prompt": "Write a limerick about a cat who hates Mondays."}]
    assert training_only(ok, prompts, prompts[1:]) == ok
    leak = ok + [{"id": "x2", "prompt": "Continue: the old mill by the river burned down in the spring."}]
    with pytest.raises(ValueError, match=r"share passages with held-out prompts: \[\('x2', 'v'\)\]"):
        training_only(leak, prompts, prompts[1:])
    with pytest.raises(ValueError, match=r"reuse prompt ids: \['a'\]"):
        training_only([{"id": "a", "prompt": "Name three rivers."}], prompts, prompts[1:])


def test_shared_passages_finds_reused_text_not_templates():
    from mtpdraft.train.data import passage_groups, shared_passages, split_prompts, split_sets

    passage = "The lake froze early that winter and the fishermen cut holes in the ice."
    a = [{"id": "t1", "prompt": "English: My brother works in a hospital.\nFrench:"},
         {"id": "t2", "prompt": f"Summarize the following text in one or two sentences.\n\n{passage}\n\nSummary:"},
         {"id": "t3", "prompt": "Write a short story about a robot who learns to paint."},
         {"id": "t4", "prompt": "What is the difference between weather and climate?"}]
    b = [{"id": "b1", "prompt": "Translate into Italian: My brother works in a hospital."},
         {"id": "b2", "prompt": f"{passage}\n\nTL;DR:"},
         {"id": "b3", "prompt": "Write a short story about a lighthouse keeper and her dog."},
         {"id": "b4", "turns": ["Hello!", "what is the difference between weather and climate"]}]
    assert shared_passages(a, b) == [("t1", "b1"), ("t2", "b2"), ("t4", "b4")]
    groups = sorted(sorted(p["id"] for p in g) for g in passage_groups(a + b))
    assert ["b1", "t1"] in groups and ["b2", "t2"] in groups and ["b3"] in groups
    # a split never separates prompts that share a passage
    cats = [dict(p, category="c") for p in a + b]
    for seed in range(5):
        train, held = split_prompts(cats, 0.3, seed)
        assert shared_passages(train, held) == [] and len(train) + len(held) == len(cats)
        train, val, evals = split_sets(cats, 0.25, 0.25, seed)
        assert len(train) + len(val) + len(evals) == len(cats)
        assert shared_passages(train, val) == shared_passages(train + val, evals) == []


def test_chat_models_train_on_chat_formatted_prompts(tmp_path):
    """A tokenizer with a chat template: the data and eval prompts are user messages
    through it (as a chat model is served), the user text cut to max_prompt_tokens."""
    from mtpdraft.train.data import encode_prompt, uses_chat
    from mtpdraft.train.train import TrainConfig, make_jobs

    d = tiny_model_dir(tmp_path / "chat", "llama")
    cfg_path = d / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text())
    tc["chat_template"] = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                           "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    cfg_path.write_text(json.dumps(tc))
    _, tok = load(str(d), "fp32")
    assert uses_chat(tok, None) and not uses_chat(tok, False)
    ids = encode_prompt(tok, "Why is the sky blue?", True, 96)
    assert tok.decode(ids) == "<|user|>Why is the sky blue?\n<|assistant|>"
    assert tok.decode(encode_prompt(tok, "Why is the sky blue?", True, 3)) == "<|user|>Why\n<|assistant|>"
    jobs = make_jobs(TrainConfig(opened_per_prompt=1, bos_openings=0), tok,
                     [{"id": "a", "prompt": "Hello there"}], 0, [{"id": "b", "prompt": "Name a color."}])
    assert [j["source"] for j in jobs] == ["a:greedy", "a:opened0", "val/b:greedy", "val/b:opened0"]
    assert tok.decode(jobs[0]["prompt"]) == "<|user|>Hello there\n<|assistant|>"
    _, plain_tok = load(str(tiny_model_dir(tmp_path / "plain", "llama")), "fp32")
    assert not uses_chat(plain_tok, None)
    with pytest.raises(ValueError, match="no chat template"):
        uses_chat(plain_tok, True)
    assert make_jobs(TrainConfig(bos_openings=0, opened_per_prompt=0), plain_tok, [{"id": "a", "prompt": "Hi"}],
                     0)[0]["prompt"] == plain_tok("Hi").input_ids


def test_training_reads_a_quantized_targets_table_dequantized_once(tiny, one_thread):
    """The default weights are quantized: the drafter's tied table is then the target's
    quantized head, which training reads as one cached fp32 copy."""
    from mtpdraft import kernels
    from mtpdraft.train.model import output_table

    path, _, _ = tiny
    model, _ = load(str(path), "q8_0")
    assert isinstance(model.head_weight, kernels.QWeight)
    dr = _randomized(model, ["full_attention"])
    t = output_table(dr, model)
    assert t is output_table(dr, model) and t.dtype == torch.float32
    torch.testing.assert_close(t, kernels.dense(model.head_weight), rtol=0, atol=0)
    y = torch.randn(8, model.args.hidden_size)
    loss, _ = head_loss(dr, model, y, torch.randint(0, model.vocab_size, (8,)), cluster_of(dr), extra_clusters=2)
    assert torch.isfinite(loss)


def test_data_file_is_teacher_forced_and_labelled_by_the_target(tiny, tmp_path, one_thread):
    """--data FILE.jsonl: each text becomes a sequence whose every position is labelled by
    the target's argmax; malformed files are errors that name the line."""
    from mtpdraft.train.train import TrainConfig, file_sequences, stage_data

    path, model, tok = tiny
    f = tmp_path / "mine.jsonl"
    f.write_text('{"text": "The harbour was quiet at dawn."}\n\n{"text": "Ships came in one by one."}\n')
    cfg = TrainConfig.quick_config(out=str(tmp_path / "run"), data_file=str(f), bos_openings=0)
    seqs = stage_data(cfg, model, tok, [])
    assert [s["source"] for s in seqs] == ["file:1", "file:3"]
    assert seqs[0]["tokens"] == tok("The harbour was quiet at dawn.").input_ids
    feats = compute_features(model, seqs, [0])
    s = seqs[0]
    n = len(s["tokens"])
    logits = model(torch.tensor([s["tokens"]]), model.new_cache(1, 64)).logits[0]
    assert feats.labels[:n - 1].tolist() == logits[:-1].argmax(-1).tolist() and int(feats.train_from[0]) == 0
    assert stage_data(cfg, model, tok, []) == seqs  # resumes: nothing new
    for text, msg in [('{"text": 3}', 'line 1: expected an object'), ("not json", "line 1: not JSON"),
                      ('{"text": " "}', 'line 1: expected an object')]:
        f.write_text(text + "\n")
        with pytest.raises(ValueError, match=msg):
            file_sequences(cfg, tok, 0)
    with pytest.raises(FileNotFoundError, match="no such file"):
        file_sequences(TrainConfig(data_file=str(tmp_path / "missing.jsonl")), tok, 0)


def test_a_data_budget_cuts_training_jobs_never_validation(tiny, tmp_path, one_thread):
    """Every choice is made on the validation sequences: they are written first, whatever the
    budget (a 40-min budget cut of shuffled jobs once kept 4 of 68); the budget cuts the training jobs only
    (here all of them: it is spent at once)."""
    from mtpdraft.train.train import TrainConfig, stage_data

    _, model, tok = tiny
    train = [{"id": f"t{i}", "prompt": f"Training prompt number {i}"} for i in range(40)]
    val = [{"id": f"v{i}", "prompt": f"Validation prompt {i}"} for i in range(20)]
    cfg = TrainConfig.quick_config(out=str(tmp_path / "run"), bos_openings=0, data_budget_s=1e-9)
    seqs = stage_data(cfg, model, tok, train, val)
    assert sorted(s["source"] for s in seqs) == sorted(f"val/v{i}:{kind}" for i in range(20)
                                                       for kind in ("greedy", "opened0"))
    assert all(len(s["tokens"]) > s["prompt_len"] for s in seqs)
    cfg = TrainConfig.quick_config(out=str(tmp_path / "all"), bos_openings=0)
    assert len(stage_data(cfg, model, tok, train, val)) == 2 * (40 + 20)  # no budget: every job


def test_input_embed_scale_is_chosen_per_target_and_applied(tiny, tmp_path, one_thread):
    """auto: the power of two bringing the target's embedding RMS nearest 1 (the tiny Llama-family
    table gets 8); scaling the embedding by s is the
    same drafter as multiplying pre_projection's embedding half by s; not a power of two: refused."""
    from mtpdraft.drafters.mtp import MTPConfig
    from mtpdraft.train.train import TrainConfig, auto_embed_scale, drafter_settings

    _, gemma, _ = tiny
    llama, _ = load(str(tiny_model_dir(tmp_path / "llama", "llama")), "fp32")
    for model in (gemma, llama):
        s = auto_embed_scale(model)
        rows = model.embed(torch.arange(model.args.vocab_size)[None]).float()
        assert 2 ** -0.5 <= float(rows.pow(2).mean().sqrt()) * s <= 2 ** 0.5
        assert drafter_settings(model, TrainConfig())["input_embed_scale"] == s
    assert drafter_settings(llama, TrainConfig(input_embed_scale=2.0))["input_embed_scale"] == 2.0
    assert auto_embed_scale(llama) > 1  # its table is small: the scale is not a no-op

    d1 = _randomized(llama, ["full_attention"])
    d8 = new_drafter(llama, dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                 layer_types=["full_attention"], num_centroids=32, centroid_intermediate_top_k=8,
                                 tie_output_to_target=True, input_embed_scale=8.0), 0)
    d8.load_state_dict(d1.state_dict())
    tokens, pos = torch.tensor([[5, 9, 11]]), torch.arange(3)[None]
    h = torch.randn(1, 3, llama.args.hidden_size, generator=torch.Generator().manual_seed(0))
    srcs = d1.source_attentions(llama)
    attend = lambda j, q, window: q  # noqa: E731  (any fixed function of q: the embedding path is what differs)
    with torch.no_grad():
        unscaled = d1.states(llama, tokens, h, pos, srcs, attend)[1]
        d1.pre_projection.weight[:, :llama.args.hidden_size] *= 8
        a, b = d1.states(llama, tokens, h, pos, srcs, attend)[1], d8.states(llama, tokens, h, pos, srcs, attend)[1]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unscaled, b, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="not a power of two"):
        MTPConfig.for_target(llama, input_embed_scale=3.0)
    # a resumed run keeps the scale its untrained copy was made with (a checkpoint holds tensors only)
    from mtpdraft.train.train import initial_drafter

    run = tmp_path / "run"
    d8.config.input_embed_scale = 2.0  # not the auto value (8 for this table)
    d8.save(run / "untrained")
    small = dict(hidden_size=32, intermediate_size=64, num_centroids=32, centroid_top_k=8)
    assert auto_embed_scale(llama) != 2.0
    assert initial_drafter(TrainConfig(out=str(run), **small), llama).config.input_embed_scale == 2.0
    assert initial_drafter(TrainConfig(out=str(tmp_path / "fresh"), **small), llama).config.input_embed_scale == \
        auto_embed_scale(llama)


def test_recorded_features_are_those_of_a_second_forward(tiny, one_thread):
    """The data stage's decoding records what the features stage would compute with a second
    forward over the written text: hidden states, the read layers' K/V, the labels (a sampled
    row's: the target's argmax). Only a sequence's last position, which decoding never runs,
    is left out (zeros, no label)."""
    from mtpdraft.train.data import Job, generate_batch
    from mtpdraft.train.features import recorded_features

    _, model, tok = tiny
    layers = sorted(set(source_layers(["sliding_attention", "full_attention"], model)))
    prompts = [tok(t).input_ids for t in ["abc", "a longer prompt here", "xyz xyz", "q"]]
    jobs = [Job(prompts[0], 20), Job(prompts[1], 9), Job(prompts[2], 15, temperature=1.0, seed=3, sample_first=-1),
            Job(prompts[3], 12, temperature=1.0, seed=4, sample_first=4)]
    out = generate_batch(model, jobs, eos_ids=set(), max_rows=2, record=layers)
    assert [t for t, _ in out] == generate_batch(model, jobs, eos_ids=set(), max_rows=2)  # recording changes nothing
    seqs = [dict(id=i, tokens=t, prompt_len=len(j.prompt),
                 greedy_from=-1 if j.sample_first < 0 else len(j.prompt) + j.sample_first)
            for i, (j, (t, _)) in enumerate(zip(jobs, out))]
    got = recorded_features(seqs, [r for _, r in out], layers, dtype=torch.float32)
    ref = compute_features(model, seqs, layers, batch_tokens=32, dtype=torch.float32)
    for name in ("offsets", "tokens", "train_from"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    last = got.offsets[1:] - 1
    run = torch.ones(int(got.offsets[-1]), dtype=torch.bool)
    run[last] = False
    torch.testing.assert_close(got.hidden[run], ref.hidden[run], rtol=1e-5, atol=1e-5)
    for (k, v), (rk, rv) in zip(got.kv, ref.kv):
        torch.testing.assert_close(k[run], rk[run], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v[run], rv[run], rtol=1e-5, atol=1e-5)
    assert (got.labels[last] == -1).all() and not got.hidden[last].any()
    s = seqs[2]  # the sampled row: labelled by the target's argmax, not by its own sampled tokens
    lo, hi = int(got.offsets[2]) + s["prompt_len"] - 1, int(got.offsets[3]) - 1
    logits = model(torch.tensor([s["tokens"]]), model.new_cache(1, 64)).logits[0]
    assert got.labels[lo:hi].tolist() == logits[s["prompt_len"] - 1:-1].argmax(-1).tolist()
    assert got.labels[lo:hi].tolist() != s["tokens"][s["prompt_len"]:]
    sampled = torch.zeros_like(run)
    sampled[lo:hi] = True  # (compute_features labels it with a bf16 copy of the head: near ties may differ)
    assert torch.equal(got.labels[run & ~sampled], ref.labels[run & ~sampled])
    with pytest.raises(ValueError, match="do not match"):
        recorded_features(seqs[:1], [out[1][1]], layers)
