"""How well a drafter's distribution matches the target's, on text the target samples:
the expected acceptance of its first drafted token at temperature T, sum_x min(p_T(x), q_T(x))
(p: the target's distribution for the next-but-one token, q: the drafter's over the clusters
its head searches), teacher-forced at every position of the target's own samples.

The target first samples `--max-new-tokens` tokens for each prompt (seed = the prompt's
index), then each drafter is scored on those same sequences. Run it on the training prompts
and on the validation prompts to see how much of the overlap a drafter learned for its
training prompts' content only:

    python benchmarks/sampled_overlap.py mtpdraft/drafters/shipped/gemma-3-270m --prompts validation
    python benchmarks/sampled_overlap.py mtpdraft/drafters/shipped/gemma-3-270m --prompts train

Unlike the real loop's position-1 acceptance (compare_drafters.py), every position counts
here, not only the positions where a cycle starts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mtpdraft import load
from mtpdraft.config import SamplingParams
from mtpdraft.decoding.engine import generate
from mtpdraft.drafters.mtp import MTPDrafter
from mtpdraft.train.data import encode_prompt, uses_chat
from mtpdraft.train.features import compute_features
from mtpdraft.train.model import _lin, head_candidates, output_table, unrolled
from mtpdraft.train.train import TrainConfig


@torch.no_grad()
def overlap(drafter: MTPDrafter, model, seqs: list[dict], temperature: float) -> tuple[float, int]:
    c = drafter.config
    if not (c.tie_output_to_target and c.use_ordered_embeddings):
        raise ValueError("this measure reads a clustered head tied to the target's table")
    feats = compute_features(model, seqs, sorted(set(drafter.source_layers(model))), 4096)
    table = output_table(drafter, model).float()
    total, n = 0.0, 0
    for i in range(len(seqs)):
        b = feats.batch([i])
        (_, h), = unrolled(drafter, model, b["tokens"], b["hidden"], b["kv"], 1)
        T = b["tokens"].shape[1]
        # row p of step 1 predicts token p + 2, whose distribution the target's hidden at p + 1 gives
        nxt = b["hidden"][:, 1:]
        ok = (torch.arange(T - 1)[None] >= b["train_from"][:, None])
        y, ht = h[:, : T - 1][ok].float(), nxt[ok].float()
        p = torch.softmax(_lin(ht, table) / temperature, -1)
        ids, logits = head_candidates(drafter, model, y)
        q = torch.softmax(logits / temperature, -1)
        total += float(torch.minimum(p.gather(1, ids), q).sum())
        n += y.shape[0]
    return total / max(n, 1), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("drafters", nargs="+", help="drafter directories")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompts", choices=["train", "validation", "eval"], default="validation",
                    help="that split of the bundled training prompts, as `mtpdraft train` makes it by default")
    ap.add_argument("--limit", type=int, default=12, help="prompts")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    if a.temperature <= 0:
        ap.error("--temperature must be > 0")
    model, tok = load(a.model, a.dtype)
    cfg = TrainConfig()
    train, val, evals = cfg.prompt_sets()
    rows = {"train": train, "validation": val, "eval": evals}[a.prompts][: a.limit]
    chat = uses_chat(tok, None)
    seqs = []
    for i, row in enumerate(rows):
        ids = encode_prompt(tok, row["prompt"], chat, cfg.max_prompt_tokens)
        out = list(generate(model, ids, SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                                       seed=i)))
        seqs.append(dict(id=i, source=row["id"], tokens=ids + out, prompt_len=len(ids), greedy_from=len(ids)))
    res = {"prompts": a.prompts, "prompt_ids": [r["id"] for r in rows], "temperature": a.temperature,
           "weights": model.weights_format, "drafters": {}}
    for d in a.drafters:
        ov, n = overlap(MTPDrafter.load(d), model, seqs, a.temperature)
        res["drafters"][d] = {"expected_first_token_acceptance": round(ov, 4), "positions": n}
        print(f"{d}: {ov:.4f} over {n} positions ({a.prompts}, {len(rows)} prompts, temperature {a.temperature})")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
