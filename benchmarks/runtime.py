"""Runtime benchmark: decode step vs the weight-read bound, forward cost over n
positions, the one-call layer stack vs the same kernels block by block, plain decoding
vs transformers generate(), and the cost of one MTP drafting step (dense vs clustered; the shipped
drafter's as one native call and through Python-level calls).

    python benchmarks/runtime.py --max-new-tokens 64 --rounds 2            # default weights (the GGUF's blocks)
    python benchmarks/runtime.py --dtype bf16 --max-new-tokens 64 --rounds 2

Everything is measured interleaved in one process; ratios are what to compare.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import mtpdraft
from mtpdraft.bench import machine_info
from mtpdraft.config import SamplingParams, Stats
from mtpdraft.decoding import generate
from mtpdraft.drafters import MTPConfig, MTPDrafter, MTPDraftSource, make_drafter, shipped_drafter_dir
from mtpdraft.drafters.base import DraftContext

PROMPTS = ["The history of the printing press", "def binary_search(arr, target):\n",
           "Q: Why is the sky blue?\nA:", "My favourite recipe for soup is"]


def bandwidth_gbs(mb: int = 1024, reps: int = 5) -> float:
    """Read bandwidth from a large sum (best of reps)."""
    x = torch.ones(mb * 2**20 // 4)
    best = min((lambda t0: (x.sum(), time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(reps))
    return x.numel() * 4 / best / 1e9


def decode_step_ms(model, n_new: int, reps: int = 20) -> float:
    cache = model.new_cache(1, 512)
    model.prefill(torch.tensor([[2] + list(range(1000, 1200))]), cache)
    base = cache.lengths[0]
    toks = torch.arange(3000, 3000 + n_new)[None]
    times = []
    for _ in range(reps):
        cache.truncate(0, base)
        t0 = time.perf_counter()
        model(toks, cache, logits="all")
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def draft_step_ms(model, clustered: bool, reps: int = 60, src=None) -> float:
    """One drafting step: a random drafter (Gemma 4 assistant-like head, k_c 32 of 2048
    clusters, its own table), or `src`."""
    if src is None:
        cfg = MTPConfig.for_target(model, use_ordered_embeddings=clustered)
        src = MTPDraftSource(MTPDrafter.random(cfg).to_dtype(model.dtype))
    cache = model.new_cache(1, 512)
    out = model.prefill(torch.tensor([[2] + list(range(1000, 1200))]), cache)
    ctx = DraftContext(list(range(201)), out.hidden[0, -1], model, cache)
    src.propose(ctx, 1)
    times = []
    for _ in range(reps):  # median of the rounds of 4 steps, as for the decode step
        t0 = time.perf_counter()
        src.propose(ctx, 4)
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[reps // 2] / 4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="auto", help="auto | gguf | q8_0 | bf16 | fp32")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    model, tok = mtpdraft.load("gemma-3-270m", args.dtype)
    res = {"machine": {"cpu": machine_info()["cpu"], "threads": torch.get_num_threads(),
                       "torch": torch.__version__}, "dtype": args.dtype, "weights": model.weights_format}

    bw = bandwidth_gbs()
    wb = model.weight_bytes()
    res["bandwidth_GBps"] = round(bw, 1)
    res["weight_MB"] = round(wb / 1e6, 1)
    res["weight_read_bound_ms"] = round(wb / bw / 1e6, 2)
    fw = {n: [] for n in (1, 2, 4, 5, 7, 8, 9, 11, 16)}  # k+1 positions verify a draft of k
    for _ in range(3):  # interleaved rounds, median of the rounds' medians
        for n in fw:
            fw[n].append(decode_step_ms(model, n, reps=10))
    res["forward_ms"] = {n: round(sorted(v)[1], 2) for n, v in fw.items()}
    res["forward_over_n1"] = {n: round(v / res["forward_ms"][1], 2) for n, v in res["forward_ms"].items()}
    res["step_over_bound"] = round(res["forward_ms"][1] / res["weight_read_bound_ms"], 2)
    stack = model.layer_stack
    if stack is not None:  # the layers as one native call vs the same kernels called block by block
        ab = {(s, n): [] for s in ("stack", "blocks") for n in (1, 7)}
        for _ in range(4):
            for s, n in ab:
                model.layer_stack = stack if s == "stack" else None
                ab[s, n].append(decode_step_ms(model, n, reps=10))
        model.layer_stack = stack
        res["layer_stack_ms"] = {f"{s}_n{n}": round(sorted(v)[1], 2) for (s, n), v in ab.items()}
        res["layer_stack_over_blocks"] = {n: round(sorted(ab["stack", n])[1] / sorted(ab["blocks", n])[1], 3)
                                          for n in (1, 7)}
    res["draft_step_ms"] = {"clustered": round(draft_step_ms(model, True), 2),
                            "dense": round(draft_step_ms(model, False), 2)}
    shipped = shipped_drafter_dir("gemma-3-270m")
    if shipped:  # the drafter `--drafter auto` ships for this model (tied to the target's table)
        src = make_drafter(str(shipped), model)
        ms = draft_step_ms(model, True, src=src)
        src.drafter.native_step = lambda target: None  # the same step through Python-level calls
        res["draft_step_ms"]["shipped_python_calls"] = round(draft_step_ms(model, True, src=src), 3)
        res["draft_step_ms"]["shipped"] = round(ms, 3)
        res["shipped_draft_step_over_decode_step"] = round(ms / res["forward_ms"][1], 3)

    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        dt = torch.float32 if model.weights_format == "fp32" else torch.bfloat16  # transformers runs dense weights
        hf = AutoModelForCausalLM.from_pretrained(str(model.path), dtype=dt).eval()
    ours_tok = ours_s = hf_tok = hf_s = 0.0
    for _ in range(args.rounds):
        for p in PROMPTS:  # interleaved: ours then transformers, same prompt
            ids = tok(p).input_ids
            st = Stats()
            list(generate(model, ids, SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True), stats=st))
            ours_tok += st.decode_tokens
            ours_s += st.decode_s
            if hf is not None:
                x = torch.tensor([ids])
                with torch.no_grad():
                    t0 = time.perf_counter()
                    hf.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False)
                    t1 = time.perf_counter()
                    out = hf.generate(x, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                      do_sample=False)
                    t2 = time.perf_counter()
                # subtract the prefill (a 1-token generate) to compare decoding only
                hf_tok += out.shape[1] - x.shape[1] - 1
                hf_s += (t2 - t1) - (t1 - t0)
    res["mtpdraft_tokens_per_s"] = round(ours_tok / ours_s, 2)
    if hf is not None:
        res["transformers_tokens_per_s"] = round(hf_tok / hf_s, 2)
        res["speedup_vs_transformers"] = round(res["mtpdraft_tokens_per_s"] / res["transformers_tokens_per_s"], 2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
