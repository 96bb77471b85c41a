"""Training speed and quality per `train_precision`: the same drafter (the run's
config, seed 0) trained for the same number of iterations on one run's features in
each precision, one after the other; prints seconds per iteration and the final
teacher-forced validation metrics (what `mtpdraft train` logs).

    python benchmarks/train_precision.py RUN --iters 300 --precision bf16,fp32 \\
        --json benchmarks/results/train_precision.json

RUN is a finished `mtpdraft train` run directory (its config.json and features/);
each precision trains into RUN-precision-ITERS/ (removed first).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import fields
from pathlib import Path

import torch

from mtpdraft import load
from mtpdraft.train.features import Features
from mtpdraft.train.train import TrainConfig, stage_train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a training run's directory")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--precision", default="bf16,fp32", help="train_precision values, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    known = {f.name for f in fields(TrainConfig)}  # a run from before a setting was renamed
    base = {k: v for k, v in json.loads((args.run / "config.json").read_text()).items() if k in known}
    target, _ = load(base["model"], base.get("dtype", "auto"))
    # memory-mapped: a large run's train.pt is read as batches need it
    train, val = (Features.load(args.run / "features" / f"{n}.pt", mmap=True) for n in ("train", "val"))
    res = []
    for prec in [p for p in args.precision.split(",") if p]:
        out = Path(f"{args.run}-{prec}-{args.iters}")
        shutil.rmtree(out, ignore_errors=True)
        cfg = TrainConfig(**{**base, "out": str(out), "train_budget_s": 0.0, "train_deadline": "",
                             "max_iters": args.iters, "train_precision": prec})
        t = time.perf_counter()
        stage_train(cfg, target, train, val)
        wall = time.perf_counter() - t
        last = json.loads((out / "train_log.json").read_text())["log"][-1]
        r = dict(precision=prec, iterations=args.iters, seconds=round(wall, 1),
                 s_per_iteration=round(last["s"] / args.iters, 3), **last)
        print(json.dumps(r), flush=True)
        res.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
