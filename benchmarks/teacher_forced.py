"""Teacher-forced validation metrics of several drafters on one training run's validation
features (RUN/features/val.pt): what `mtpdraft train` logs as val_tau, so drafters from
different runs can be compared on the same positions, at each centroid top-k given.

    python benchmarks/teacher_forced.py --model gemma-3-270m RUN/features/val.pt \\
        mtpdraft/drafters/shipped/gemma-3-270m RUN/drafter --top-k 4,32
"""

from __future__ import annotations

import argparse
import json

import torch

from mtpdraft import load
from mtpdraft.drafters.mtp import MTPDrafter
from mtpdraft.train.features import Features
from mtpdraft.train.train import TrainConfig, cluster_of, validate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("features", help="a run's features/val.pt")
    ap.add_argument("drafters", nargs="+", help="drafter directories")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--top-k", default="", help="centroid top-k values, comma-separated (default: each drafter's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    target, _ = load(args.model, args.dtype)
    val = Features.load(args.features)
    cfg = TrainConfig(model=args.model)
    res = []
    for d in args.drafters:
        drafter = MTPDrafter.load(d)
        clusters = cluster_of(drafter)
        ks = [int(k) for k in args.top_k.split(",") if k] or [drafter.config.centroid_intermediate_top_k]
        for k in ks:
            if drafter.config.use_ordered_embeddings:
                drafter.config.centroid_intermediate_top_k = k
            r = dict(drafter=d, centroid_top_k=k, **validate(drafter, target, val, cfg, clusters))
            print(json.dumps(r))
            res.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
