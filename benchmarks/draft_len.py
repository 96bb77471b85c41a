"""Pick a draft length on the validation prompts of `mtpdraft train`'s split (never the
eval or bench prompts).

    python benchmarks/draft_len.py --drafter auto --ks 4,5,6,a6,a8
    python benchmarks/draft_len.py --drafter ngram --ks 4,6 --limit 20

Per prompt, plain decoding and every k run interleaved on the same model (greedy,
outputs must be identical); prints tau and speedup over plain, summed over prompts.
`aN` = adaptive draft length up to N.
"""

from __future__ import annotations

import argparse

import mtpdraft
from mtpdraft.config import SamplingParams, SpecParams, Stats
from mtpdraft.decoding.engine import generate
from mtpdraft.drafters import make_drafter
from mtpdraft.drafters.combined import ByTemperature
from mtpdraft.train.train import TrainConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--drafter", default="auto")
    ap.add_argument("--ks", default="4,5,6")
    ap.add_argument("--limit", type=int, default=0, help="first N validation prompts (0 = all)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="auto", help="weights: auto | gguf | q8_0 | bf16 | fp32")
    a = ap.parse_args()
    _, held, _ = TrainConfig().prompt_sets()  # validation
    held = held[: a.limit] if a.limit else held
    model, tok = mtpdraft.load(a.model, a.dtype)
    drafter = make_drafter(a.drafter, model, a.model)
    if isinstance(drafter, ByTemperature):  # auto's variants at the lengths asked, not capped to auto's own
        drafter = ByTemperature(drafter.greedy, drafter.sampled)
    ks = a.ks.split(",")
    specs = {k: SpecParams(draft_len=int(k.lstrip("a")), adaptive=k.startswith("a")) for k in ks}
    sp = SamplingParams(max_new_tokens=a.max_new_tokens)
    st = {k: Stats() for k in ["plain"] + ks}
    list(generate(model, tok(held[0]["prompt"]).input_ids, SamplingParams(max_new_tokens=16), drafter=drafter))  # warm-up
    for i, p in enumerate(held):
        ids = tok(p["prompt"]).input_ids
        ref = list(generate(model, ids, sp, tokenizer=tok, stats=st["plain"]))
        for k in ks:
            out = list(generate(model, ids, sp, drafter=drafter, spec=specs[k], tokenizer=tok, stats=st[k]))
            assert out == ref, f"prompt {p['id']}: k={k} output differs from plain decoding"
    base = st["plain"].decode_tokens / st["plain"].decode_s
    print(f"{a.model} {model.weights_format}, drafter {a.drafter}, {len(held)} validation prompts, {a.max_new_tokens} tokens: "
          f"plain {base:.1f} tok/s")
    for k in ks:
        s = st[k]
        print(f"k={k}: tau {s.mean_accepted_tokens:.2f}, {s.decode_tokens / s.decode_s / base:.2f}x plain")


if __name__ == "__main__":
    main()
