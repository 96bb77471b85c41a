"""Weight formats side by side: resident memory after load and plain greedy decode speed.

    python benchmarks/weights.py --formats auto,q8_0,bf16 --rounds 2 --max-new-tokens 128

Each (round, format) runs in a fresh process (so RSS is that format's alone), formats
interleaved within a round; tokens/s are decode-only (prefill excluded), summed over
the prompts. RSS is reported whole and as what loading the model added (after importing torch).
`auto` is the GGUF file's own blocks; `q8_0` quantizes the safetensors
conversion at load (cached after the first load, which this script does up front).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

PROMPTS = ["The history of the printing press", "def binary_search(arr, target):\n",
           "Q: Why is the sky blue?\nA:", "My favourite recipe for soup is"]

CHILD = r"""
import json, sys, torch
import mtpdraft
from mtpdraft.config import SamplingParams, Stats
from mtpdraft.decoding import generate
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) * 1024
rss0 = rss()
model, tok = mtpdraft.load(sys.argv[1], sys.argv[2])
torch.set_num_threads(int(sys.argv[4]))
rss1 = rss()
n = s = 0.0
for p in json.loads(sys.argv[5]):
    st = Stats()
    list(generate(model, tok(p).input_ids, SamplingParams(max_new_tokens=int(sys.argv[3]), ignore_eos=True), stats=st))
    n += st.decode_tokens
    s += st.decode_s
print(json.dumps({"weights": model.weights_format, "weight_bytes": model.weight_bytes(), "rss_bytes": rss1,
                  "load_rss_bytes": rss1 - rss0,
                  "tokens_per_s": n / s}))
"""


def run(model, fmt, tokens, threads, prompts):
    out = subprocess.run([sys.executable, "-c", CHILD, model, fmt, str(tokens), str(threads), json.dumps(prompts)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--formats", default="auto,q8_0,bf16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    fmts = args.formats.split(",")
    for f in fmts:  # warm-up: conversion, q8_0 cache, compiled kernels
        run(args.model, f, 4, args.threads, PROMPTS[:1])
    res = {f: [] for f in fmts}
    for _ in range(args.rounds):
        for f in fmts:
            res[f].append(run(args.model, f, args.max_new_tokens, args.threads, PROMPTS))
    summary = {}
    for f, rs in res.items():
        best = max(r["tokens_per_s"] for r in rs)
        summary[f] = {"weights": rs[0]["weights"], "weight_MiB": round(rs[0]["weight_bytes"] / 2**20, 1),
                      "rss_MiB": round(min(r["rss_bytes"] for r in rs) / 2**20, 1),
                      "rss_added_by_load_MiB": round(min(r["load_rss_bytes"] for r in rs) / 2**20, 1),
                      "tokens_per_s": [round(r["tokens_per_s"], 1) for r in rs], "best_tokens_per_s": round(best, 1)}
    base = fmts[-1]
    for f in fmts:
        summary[f][f"speed_vs_{base}"] = round(summary[f]["best_tokens_per_s"] / summary[base]["best_tokens_per_s"], 2)
        summary[f][f"load_rss_vs_{base}"] = round(summary[f]["rss_added_by_load_MiB"] /
                                                  summary[base]["rss_added_by_load_MiB"], 2)
    print(json.dumps({"model": args.model, "threads": args.threads, "max_new_tokens": args.max_new_tokens,
                      "formats": summary}, indent=2))


if __name__ == "__main__":
    main()
