"""Attention's AVX-512 passes against its AVX2 passes (the same bits) on a whole model:
prompt prefill and target forwards over 1 and 7 positions at short and long context.

    python benchmarks/attention.py --model smollm2-135m-instruct
    python benchmarks/attention.py --model gemma-3-270m --json OUT.json

Both kinds of passes run in one process, interleaved, best of the rounds; ratios are what to
compare. Needs a CPU with AVX-512 (F, DQ, BW, VL).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import mtpdraft
from mtpdraft import kernels as K
from mtpdraft.bench import machine_info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    mod = K._load()
    if mod is None or not mod._attention_avx512():
        raise SystemExit("this CPU runs only the AVX2 attention passes: nothing to compare")
    model, _ = mtpdraft.load(a.model)
    g = torch.Generator().manual_seed(0)

    def prefill_s(n):
        ids = torch.randint(100, 20000, (1, n), generator=g)
        cache = model.new_cache(1, n + 16)
        t0 = time.perf_counter()
        model.prefill(ids, cache)
        return time.perf_counter() - t0

    def forward_ms(ctx, n):
        cache = model.new_cache(1, ctx + 16)
        model.prefill(torch.randint(100, 20000, (1, ctx), generator=g), cache)
        base, toks, ts = cache.lengths[0], torch.arange(3000, 3000 + n)[None], []
        for _ in range(15):
            cache.truncate(0, base)
            t0 = time.perf_counter()
            model(toks, cache, logits="all")
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    cases = {"prefill 1024 tokens (s)": lambda: prefill_s(1024), "prefill 2048 tokens (s)": lambda: prefill_s(2048),
             "forward, 200 cached, 1 position (ms)": lambda: forward_ms(200, 1),
             "forward, 200 cached, 7 positions (ms)": lambda: forward_ms(200, 7),
             "forward, 2000 cached, 1 position (ms)": lambda: forward_ms(2000, 1),
             "forward, 2000 cached, 7 positions (ms)": lambda: forward_ms(2000, 7)}
    t = {(c, isa): [] for c in cases for isa in ("avx2", "avx512")}
    try:
        for _ in range(a.rounds):
            for isa in ("avx2", "avx512"):
                mod._set_attention_avx512(int(isa == "avx512"))
                for c, fn in cases.items():
                    t[c, isa].append(fn())
    finally:
        mod._set_attention_avx512(-1)
    res = {"model": a.model, "machine": machine_info()["cpu"], "threads": torch.get_num_threads(), "cases": {
        c: {"avx2": round(min(t[c, "avx2"]), 4), "avx512": round(min(t[c, "avx512"]), 4),
            "avx2_over_avx512": round(min(t[c, "avx2"]) / min(t[c, "avx512"]), 2)} for c in cases}}
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            f.write(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
