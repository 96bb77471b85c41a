"""Compare drafters (e.g. a new training run's against the shipped one) on prompts none of
them was trained, validated or evaluated on, in one run with the configurations rotated
per prompt: plain, prompt lookup, each drafter alone and each + prompt lookup (gate 0.6), and with
`--fallback 1,2` prompt lookup on any n-gram match, else an MTP draft of at most that many tokens.

The default prompts (benchmarks/heldout_prompts.jsonl) share no passage with the training
or bench prompts (tests/test_train.py asserts it); they were written after the drafters
that shipped before 2026-12-04 were trained.

    python benchmarks/compare_drafters.py --model gemma-3-270m \\
        mtpdraft/drafters/shipped/gemma-3-270m ~/.cache/mtpdraft/runs/NEW/drafter

`--prompts eval` (or `validation`) takes that split of the bundled training prompt file
instead, as `mtpdraft train` splits it with its default settings; `--temperature 0.7`
samples (each configuration with the same seed per prompt; outputs are then not compared).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mtpdraft import load
from mtpdraft.bench import machine_info
from mtpdraft.drafters import MTPDraftSource, NgramDrafter, make_drafter
from mtpdraft.drafters.combined import CombinedDrafter
from mtpdraft.drafters.datastore import Datastore, DatastoreDrafter
from mtpdraft.train.data import encode_prompt, load_prompts, uses_chat
from mtpdraft.train.evaluate import at_draft_lens, evaluate
from mtpdraft.train.train import TrainConfig

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("drafters", nargs="+", help="drafter directories")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompts", default=str(HERE / "heldout_prompts.jsonl"),
                    help="JSONL file, or eval / validation: that split of the bundled training prompts")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--draft-len", default="6",
                    help="draft length(s), comma-separated: with several, every drafting configuration runs at each, "
                         "in one run")
    ap.add_argument("--gate", default="0.6", help="confidence gate(s) of the combined configurations, comma-separated")
    ap.add_argument("--fallback", default="", help="MTP draft caps of the fallback configurations, comma-separated")
    ap.add_argument("--datastore", default=None,
                    help="a datastore file, or a training run whose data it is built from: adds lookup in it "
                         "(after prompt lookup, before the MTP drafter) to the configurations named by --ds")
    ap.add_argument("--ds", default="",
                    help="with --datastore: configurations as VARIANT@MIN_MATCH[/MIN_SHARE], comma-separated; VARIANT: lookup "
                         "(prompt lookup, then the datastore), fallbackN (then an MTP draft of at most N tokens) or "
                         "gateG (prompt lookup on a match of >= 2, the datastore, then MTP gated at G)")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    model, tok = load(a.model, a.dtype)
    chat = uses_chat(tok, None)
    if a.prompts in ("eval", "validation"):
        _, val, evals = TrainConfig().prompt_sets()
        rows = evals if a.prompts == "eval" else val
    else:
        rows = load_prompts(a.prompts)
    prompts = [encode_prompt(tok, p["prompt"], chat, TrainConfig.max_prompt_tokens) for p in rows]
    confs = {"plain": lambda: None, "ngram": lambda: NgramDrafter()}
    for d in a.drafters:
        src = make_drafter(d, model)
        confs[f"{d}"] = lambda src=src: src
        for gate in (float(g) for g in a.gate.split(",")):
            gated = MTPDraftSource(src.drafter, min_confidence=gate)
            confs[f"{d} + ngram@{gate}"] = lambda g=gated: CombinedDrafter(g, min_match=2)
        for n in (int(x) for x in a.fallback.split(",") if x):
            confs[f"{d} fallback:{n}"] = lambda src=src, n=n: CombinedDrafter.fallback(src, n)
    if a.datastore:
        p = Path(a.datastore)
        store = Datastore.from_run(p, model.vocab_size) if p.is_dir() else Datastore.load(p)
        store.check_target(model)
        print(f"datastore: {store.size} tokens, {store.num_sequences} sequences")
        for spec in (x for x in a.ds.split(",") if x):
            variant, m = spec.split("@")
            m, share = (m.split("/") + ["0"])[:2]
            ds = DatastoreDrafter(store, int(m), float(share))
            for d in (a.drafters if variant != "lookup" else [None]):
                src = make_drafter(d, model) if d else None
                if variant == "lookup":
                    f = lambda ds=ds: CombinedDrafter(None, min_match=1, store=ds)  # noqa: E731
                elif variant.startswith("fallback"):
                    f = lambda src=src, ds=ds, n=int(variant[8:]): CombinedDrafter(  # noqa: E731
                        src, min_match=1, mtp_len=n, store=ds)
                else:
                    g = MTPDraftSource(src.drafter, min_confidence=float(variant[4:]))
                    f = lambda g=g, ds=ds: CombinedDrafter(g, min_match=2, store=ds)  # noqa: E731
                confs[f"{d + ' ' if d else ''}{variant} + ds@{m}/{share}"] = f
    ks = [int(k) for k in a.draft_len.split(",")]
    lens = {}
    if len(ks) > 1:  # each drafting configuration once per draft length, named "... k=K"
        confs, lens = at_draft_lens(confs, ks)
    res = evaluate(model, tok, prompts, confs, a.max_new_tokens, ks[0], temperature=a.temperature, draft_lens=lens)
    res.update(machine=machine_info()["cpu"], threads=torch.get_num_threads(), weights=model.weights_format,
               prompt_set=a.prompts)
    print(f"{len(prompts)} prompts ({a.prompts}), {model.weights_format}, k={a.draft_len}, "
          f"{a.max_new_tokens} new tokens, temperature {a.temperature}")
    print("| drafter | tau | decode tok/s | vs plain | greedy == plain |\n|---|---|---|---|---|")
    for n, r in res["configs"].items():
        print(f"| {n} | {r['tau']:.2f} | {r['decode_tokens_per_s']:.1f} | {r.get('speedup_vs_plain', 1.0):.2f} | "
              f"{r.get('greedy_equal_to_plain', '-')} |")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
