"""Gemma 4 E2B / E4B text stacks at their published sizes, random weights.

No real Gemma 4 checkpoint can be downloaded here, but its shapes can be built: all
35 / 42 layers at the widths of Google's gemma.cpp configs (see
tests/test_gemma4_sizes.py), vocabulary 262,144, per-layer inputs, KV sharing,
and an official-layout assistant (width 256, 4 layers, 2,048 clusters, top 32).
Random weights give real speed figures (decoding reads every weight whatever its
value). Per size and weight format, measured interleaved in one process:

- resident memory after loading (RSS) and the bytes one decode step reads;
- the decode step against the weight-read bound (bytes / measured read bandwidth);
- a forward over n = 2..9 new positions (a verification of k = n - 1 drafts) over n = 1;
- one assistant drafting step;
- the speedup those costs imply, tau / (c_verify(k+1) + k c_draft) / c_1, at the
  per-position acceptance users report for Gemma 4 assistants.

    python benchmarks/gemma4_sizes.py                          # e2b and e4b, q8_0 and bf16 (where it fits)
    python benchmarks/gemma4_sizes.py --sizes e4b --formats q8_0 --json out.json

bf16 keeps a packed copy of every projection beside its source (kernels.pack), so
E4B in bf16 needs ~24 GB and is skipped unless --formats names it.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from runtime import bandwidth_gbs  # noqa: E402

from mtpdraft.bench import machine_info  # noqa: E402
from mtpdraft.drafters.base import DraftContext  # noqa: E402
from mtpdraft.drafters.mtp import MTPDraftSource  # noqa: E402
from mtpdraft.kernels import QWeight  # noqa: E402
from mtpdraft.kernels.quant import _q8_0_panels  # noqa: E402
from mtpdraft.layers import Linear  # noqa: E402
from mtpdraft.models import build_model, gemma4, quantizable  # noqa: E402
from mtpdraft.testing import random_gemma4_assistant  # noqa: E402

S, F = "sliding_attention", "full_attention"
V = 262_144


def text_config(size: str) -> dict:
    """The published text stacks (gemma.cpp gemma/configs.cc; NVIDIA Megatron-Bridge E4B)."""
    if size == "e2b":  # full every 5th layer, last 20 layers KV-shared with double-wide MLPs
        n, every, shared = 35, 5, 20
        kw = dict(hidden_size=1536, intermediate_size=6144, num_key_value_heads=1, use_double_wide_mlp=True)
    elif size == "e4b":  # full every 6th layer, last 18 KV-shared
        n, every, shared = 42, 6, 18
        kw = dict(hidden_size=2560, intermediate_size=10240, num_key_value_heads=2)
    else:
        raise SystemExit(f"unknown size {size!r} (e2b, e4b)")
    return dict(model_type="gemma4_text", vocab_size=V, vocab_size_per_layer_input=V, hidden_size_per_layer_input=256,
                num_hidden_layers=n, layer_types=[F if (i + 1) % every == 0 else S for i in range(n)],
                num_kv_shared_layers=shared, num_attention_heads=8, head_dim=256, global_head_dim=512,
                sliding_window=512, final_logit_softcapping=30.0, max_position_embeddings=131072, **kw)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def random_q8_0(rows: int, k: int, rng: np.random.Generator) -> QWeight:
    """Random Q8_0 panels (q uniform in -127..127, one small fp16 scale), built directly."""
    u = rng.integers(1, 256, size=(rows, k), dtype=np.uint8)
    d = np.full((rows, k // 32), 0.02 / 127 * 1.7, dtype=np.float16).view(np.uint8).reshape(rows, k // 32, 2)
    return QWeight([torch.from_numpy(_q8_0_panels(u, d))], ["Q8_0"], k)


def build_target(size: str, fmt: str, seed: int = 0) -> gemma4.Model:
    model = build_model(text_config(size))
    g, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    params = dict(model.named_parameters())
    qnames = quantizable(model) if fmt == "q8_0" else set()
    quant = {n: random_q8_0(*params[n].shape, rng) for n in sorted(qnames)}
    weights = {}
    for n, p in params.items():
        if n in quant:
            continue
        if p.ndim == 1:
            weights[n] = 1 + 0.05 * torch.randn(p.shape, generator=g)
        else:  # bf16 straight away: a [262144, L*256] per-layer table in fp32 would not fit
            w = torch.empty(p.shape, dtype=torch.bfloat16)
            for s in range(0, p.shape[0], 8192):
                w[s:s + 8192] = torch.randn(w[s:s + 8192].shape, generator=g) * p.shape[-1] ** -0.5
            weights[n] = w
    model.load_weights(weights, torch.bfloat16, quant or None)
    return model.eval()


def build_assistant(target: gemma4.Model, seed: int = 0, quantize: bool = True) -> MTPDraftSource:
    a = target.args
    text = dict(hidden_size=256, intermediate_size=2048, num_hidden_layers=4, layer_types=[S, S, S, F],
                num_attention_heads=4, num_key_value_heads=a.num_key_value_heads, head_dim=256, global_head_dim=512,
                vocab_size=V, sliding_window=a.sliding_window)
    d = random_gemma4_assistant(text, dict(backbone_hidden_size=a.hidden_size, num_centroids=2048,
                                           centroid_intermediate_top_k=32), seed=seed, std=None)
    d = d.to_dtype(torch.bfloat16).eval()
    d.check_target(target)
    if quantize and target.quantized:  # as make_drafter loads it for a quantized target: Q8_0 matrices
        d.quantize()
    return MTPDraftSource(d)


def step_bytes(model) -> int:
    """Bytes of weights one decode step reads: every projection and the output head
    (one row of the embedding and per-layer tables per token is negligible)."""
    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, Linear):
            w = m.qweight if m.qweight is not None else m.weight
            if id(w) not in seen:
                seen.add(id(w))
                total += w.nbytes if isinstance(w, QWeight) else w.numel() * w.element_size()
    head = model._head
    if isinstance(head, QWeight):
        total += head.nbytes
    else:
        src = getattr(head, "source", head)
        total += src.numel() * src.element_size()
    return total


def measure(size: str, fmt: str, ns: list[int], rounds: int, reps: int, bw: float) -> dict:
    t0 = time.perf_counter()
    base_rss = rss_mb()
    model = build_target(size, fmt)
    load_s = time.perf_counter() - t0
    res = {"size": size, "weights": fmt, "format": model.weights_format, "layers": model.args.num_hidden_layers,
           "build_s": round(load_s, 1), "rss_MB": round(rss_mb() - base_rss), "step_read_MB": round(step_bytes(model) / 1e6)}
    res["weight_read_bound_ms"] = round(step_bytes(model) / bw / 1e6, 1)
    cache = model.new_cache(1, 256)
    prompt = torch.randint(3, V, (1, 32), generator=torch.Generator().manual_seed(1))
    out = model.prefill(prompt, cache)
    base = cache.lengths[0]
    toks = torch.randint(3, V, (1, max(ns)), generator=torch.Generator().manual_seed(2))
    times = {n: [] for n in ns}
    for _ in range(rounds):  # interleaved: the same noise hits every n
        for n in ns:
            for _ in range(reps):
                cache.truncate(0, base)
                t = time.perf_counter()
                model(toks[:, :n], cache)
                times[n].append(time.perf_counter() - t)
    ms = {n: 1e3 * statistics.median(v) for n, v in times.items()}
    res["forward_ms"] = {n: round(v, 1) for n, v in ms.items()}
    res["forward_over_n1"] = {n: round(v / ms[1], 2) for n, v in ms.items()}
    res["step_over_bound"] = round(ms[1] / res["weight_read_bound_ms"], 2)
    cache.truncate(0, base)
    src = build_assistant(model)
    ctx = DraftContext(prompt[0].tolist(), out.hidden[0, -1], model, cache)
    src.propose(ctx, 1)  # warm (the ordered table copy, allocations)
    t = time.perf_counter()
    for _ in range(reps * 2):
        src.propose(ctx, 4)
    res["draft_step_ms"] = round(1e3 * (time.perf_counter() - t) / (reps * 2) / 4, 2)
    res["draft_step_over_decode_step"] = round(res["draft_step_ms"] / ms[1], 3)
    del model, src, cache
    gc.collect()
    return res


def implied_speedup(res: dict, acceptance: list[float]) -> dict:
    """speedup(k) = tau_k / (c(k+1)/c(1) + k c_draft/c(1)), tau_k = 1 + sum of the first k
    per-position acceptance rates (P(draft position i is accepted))."""
    out = {}
    for k in range(1, len(acceptance) + 1):
        n = k + 1
        if n not in res["forward_over_n1"]:
            continue
        tau = 1 + sum(acceptance[:k])
        cost = res["forward_over_n1"][n] + k * res["draft_step_over_decode_step"]
        out[k] = {"tau": round(tau, 2), "cost_over_step": round(cost, 2), "speedup": round(tau / cost, 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="e2b,e4b")
    ap.add_argument("--formats", default=None, help="q8_0,bf16 (default: q8_0 for both, bf16 for e2b)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--acceptance", default="0.84,0.60,0.39,0.27",
                    help="per-position acceptance rates (reported for Gemma 4 assistants at k=4)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    acc = [float(x) for x in args.acceptance.split(",")]
    ns = list(range(1, 10))
    bw = bandwidth_gbs()
    report = {"machine": {"cpu": machine_info()["cpu"], "threads": torch.get_num_threads(), "torch": torch.__version__},
              "bandwidth_GBps": round(bw, 1), "acceptance": acc, "runs": []}
    print(f"read bandwidth {bw:.1f} GB/s, {torch.get_num_threads()} threads", flush=True)
    for size in args.sizes.split(","):
        fmts = args.formats.split(",") if args.formats else (["q8_0", "bf16"] if size == "e2b" else ["q8_0"])
        for fmt in fmts:
            r = measure(size, fmt, ns, args.rounds, args.reps, bw)
            r["implied"] = implied_speedup(r, acc)
            report["runs"].append(r)
            print(json.dumps(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
