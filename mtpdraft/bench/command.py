"""`mtpdraft bench`: plain vs speculative decoding on a prompt set, with an identity check."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cliargs import add_model_args
from ..config import DEFAULT_SAMPLING


def add_parser(sub) -> argparse.ArgumentParser:
    b = sub.add_parser("bench", help="benchmark speculative against plain decoding on a prompt set",
                       description="Runs plain and speculative decoding interleaved per prompt after a warm-up, "
                                   "checks greedy outputs are token-identical and reports decode tokens/s.")
    add_model_args(b, drafter="ngram")
    b.add_argument("--prompts", default=None, help="JSONL prompt file (default: the shipped set)")
    b.add_argument("--limit", type=int, default=None, help="run only the first N prompts")
    b.add_argument("--max-new-tokens", type=int, default=DEFAULT_SAMPLING.max_new_tokens)
    b.add_argument("--temperature", type=float, default=DEFAULT_SAMPLING.temperature)
    b.add_argument("--seed", type=int, default=DEFAULT_SAMPLING.seed)
    b.add_argument("--json", metavar="OUT", help="write the results as JSON")
    b.add_argument("--report", metavar="OUT.md", help="write a Markdown report")
    b.add_argument("--plot", metavar="OUT.png", help="write a PNG plot (speedup per category, acceptance by position)")
    b.add_argument("--compare", default=None, help="also measure: comma-separated hf,llamacpp")
    b.add_argument("--allow-mismatch", action="store_true",
                   help="exit 0 even when a greedy speculative output differs from plain decoding")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)
    return b


def cmd_bench(args) -> int:
    from .report import write_plot, write_report
    from .runner import parse_compare, run_bench

    compare = parse_compare(args.compare)  # fail on a typo before loading anything
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    r = run_bench(args.model, args.drafter, args.prompts, limit=args.limit, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, dtype=args.dtype, draft_len=args.draft_len, adaptive=args.adaptive,
                  compare=compare, seed=args.seed, progress=not args.no_progress)
    for path in (args.json, args.report, args.plot):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n", encoding="utf-8")
    if args.report:
        write_report(r, args.report)
    if args.plot:
        write_plot(r, args.plot)

    b, s, ident = r["baseline"], r["speculative"], r["identical_outputs"]
    print(f"{r['model']} {r['dtype']}, drafter {r['drafter']}, {r['num_prompts']} prompts: "
          f"plain {b['tokens_per_s']:.1f} tok/s, speculative {s['tokens_per_s']:.1f} tok/s, "
          f"speedup {r['speedup'] or 0:.2f}x, mean accepted tokens {s['mean_accepted_tokens']:.2f}, "
          f"identical {ident['matched']}/{ident['total']}", file=sys.stderr)
    for name, key in (("transformers", "hf_transformers"), ("llama.cpp", "llamacpp")):
        c = r.get(key)
        if c and c.get("tokens_per_s") is not None:
            extra = (f", prompt lookup {c['prompt_lookup_tokens_per_s']:.1f} tok/s"
                     if c.get("prompt_lookup_tokens_per_s") is not None else "")
            print(f"{name}: {c['tokens_per_s']:.1f} tok/s{extra}", file=sys.stderr)
    if ident.get("mismatched_ids"):
        bad = ", ".join(map(str, ident["mismatched_ids"]))
        print(f"MISMATCH: greedy speculative output differs from plain decoding on "
              f"{len(ident['mismatched_ids'])}/{ident['total']} prompts: {bad}", file=sys.stderr)
        if not args.allow_mismatch:
            print("mtpdraft bench: failing because of the mismatch (use --allow-mismatch to exit 0)", file=sys.stderr)
            return 1
    return 0
