"""Eager torch vs mtpdraft native kernels: ``python -m mtpdraft.kernels.bench [--quick]``.

Timings are medians of interleaved runs (the machine may be noisy: read ratios).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mtpdraft import kernels as K


def _median_ms(fns, reps, inner):
    """Run the callables interleaved; return the median ms per call of each."""
    times = [[] for _ in fns]
    for _ in range(reps):
        for t, fn in zip(times, fns):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            t.append((time.perf_counter() - t0) * 1e3 / inner)
    return [statistics.median(t) for t in times]


def bench_linear(ns, quick):
    shapes = [
        ("gemma head", 262144, 640),
        ("smollm head", 49152, 576),
        ("2048x640", 2048, 640),
        ("640x2048", 640, 2048),
        ("1024x640", 1024, 640),
        ("256x640", 256, 640),
        ("1536x576", 1536, 576),
    ]
    print("linear  (ms per call; eager = F.linear with the same weight dtype, x fp32 for fp32 w / bf16 x for bf16 w)")
    print(f"{'shape':>22} {'dtype':>5} {'N':>3} {'eager':>9} {'native':>9} {'eager/nat':>9}")
    for name, O, Kd in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            w = torch.randn(O, Kd).to(dtype)
            big = O * Kd >= 10_000_000
            reps, inner = (3 if quick else 5), (1 if big else 20)
            for n in ns:
                x = torch.randn(n, Kd)
                xe = x.to(dtype)
                t_e, t_n = _median_ms([lambda: F.linear(xe, w), lambda: K.linear(x, w)], reps, inner)
                print(f"{name + f' {O}x{Kd}':>22} {str(dtype)[6:10]:>5} {n:>3} {t_e:9.3f} {t_n:9.3f} {t_e / t_n:9.2f}")
            del w


def bench_attention(ns, quick):
    print("attention (ms per call; eager = reference_attention)")
    print(f"{'case':>34} {'N':>3} {'eager':>9} {'native':>9} {'eager/nat':>9}")
    cases = [
        ("gemma H4/1 D256 ctx1024", 4, 1, 256, 1024, 0, torch.float32),
        ("gemma H4/1 D256 ctx1024 bf16", 4, 1, 256, 1024, 0, torch.bfloat16),
        ("gemma win512 C512 ctx4000", 4, 1, 256, 512, 512, torch.float32),
        ("smollm H9/3 D64 ctx2048", 9, 3, 64, 2048, 0, torch.float32),
    ]
    for name, H, Hkv, D, C, window, dtype in cases:
        kc = torch.randn(1, C, Hkv, D).to(dtype)
        vc = torch.randn(1, C, Hkv, D).to(dtype)
        for n in ns:
            q = torch.randn(1, n, H, D)
            start = (4000 if window else C - 20) - n
            pos = torch.arange(start, start + n)[None]
            kw = dict(window=window, scale=D**-0.5)
            t_e, t_n = _median_ms(
                [lambda: K.reference_attention(q, kc, vc, pos, **kw), lambda: K.attention(q, kc, vc, pos, **kw)],
                3 if quick else 5,
                5,
            )
            print(f"{name:>34} {n:>3} {t_e:9.3f} {t_n:9.3f} {t_e / t_n:9.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ns", default="1,2,4,8,16")
    ap.add_argument("--only", choices=["linear", "attention"], default=None)
    a = ap.parse_args()
    ns = [int(v) for v in a.ns.split(",")]
    print(f"native kernels: {K.native_available()}   torch {torch.__version__}   threads {torch.get_num_threads()}")
    if a.only in (None, "linear"):
        bench_linear(ns, a.quick)
    if a.only in (None, "attention"):
        bench_attention(ns, a.quick)


if __name__ == "__main__":
    main()
