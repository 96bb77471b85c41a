"""What sampling costs a decode step: plain decoding at temperature 0.7 / top-p 0.95
against greedy, on the bundled model (default weights), interleaved prompt by prompt.

    python benchmarks/sampling.py --max-new-tokens 128 --rounds 3

Reports the decode tokens/s of both, their ratio, and the choice of one token alone
(greedy argmax vs temperature + top-p + draw) over the model's real logits.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import mtpdraft
from mtpdraft.bench import machine_info
from mtpdraft.config import SamplingParams, Stats
from mtpdraft.decoding import generate, verify

PROMPTS = ["The history of the printing press", "def binary_search(arr, target):\n",
           "Q: Why is the sky blue?\nA:", "My favourite recipe for soup is"]


def choice_ms(logits: torch.Tensor, sp: SamplingParams, reps: int = 50) -> float:
    """Median time of choosing one token from logits [1, V]."""
    empty = torch.empty(0, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        verify(empty, None, logits, sp, gen)
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[reps // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.95)
    args = ap.parse_args()
    model, tok = mtpdraft.load(args.model, args.dtype)
    greedy = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    res = {"machine": {"cpu": machine_info()["cpu"], "threads": torch.get_num_threads()},
           "model": args.model, "weights": model.weights_format, "vocab": model.args.vocab_size,
           "temperature": args.temperature, "top_p": args.top_p}
    totals = {"greedy": [0, 0.0], "sampled": [0, 0.0]}
    for r in range(args.rounds):
        for i, p in enumerate(PROMPTS):  # interleaved, alternating which goes first
            ids = tok(p).input_ids
            sampled = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True,
                                     temperature=args.temperature, top_p=args.top_p, seed=100 * r + i)
            order = [("greedy", greedy), ("sampled", sampled)]
            for name, sp in order if (r + i) % 2 == 0 else order[::-1]:
                st = Stats()
                list(generate(model, ids, sp, stats=st))
                totals[name][0] += st.decode_tokens
                totals[name][1] += st.decode_s
    for name, (n, s) in totals.items():
        res[f"{name}_tokens_per_s"] = round(n / s, 2)
    res["sampled_over_greedy"] = round(res["sampled_tokens_per_s"] / res["greedy_tokens_per_s"], 4)

    cache = model.new_cache(1, 256)
    logits = model.prefill(torch.tensor([tok(PROMPTS[2]).input_ids]), cache).logits[0, -1:]
    sp = SamplingParams(temperature=args.temperature, top_p=args.top_p)
    res["choice_ms"] = {"greedy": round(choice_ms(logits, greedy), 3), "sampled": round(choice_ms(logits, sp), 3)}
    res["decode_step_ms_greedy"] = round(1e3 / res["greedy_tokens_per_s"], 2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
