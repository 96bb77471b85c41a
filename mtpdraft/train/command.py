"""`mtpdraft train`: the command line of the drafter-training pipeline."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train an MTP drafter for a model (data, features, training, eval)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="bundled name, local HF directory or .gguf file")
    p.add_argument("--out", required=True, help="run directory (every stage resumes from it)")
    p.add_argument("--quick", action="store_true", help="a few-minute budget for tiny models (CI, demos)")
    p.add_argument("--dtype", choices=["auto", "gguf", "q8_0", "bf16", "fp32"], default=None,
                   help="the target's weights (default auto: as `mtpdraft generate` runs it)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--data-budget-s", type=float, default=None, help="stop writing data after this long")
    p.add_argument("--data-only", action="store_true",
                   help="stop after the data stage and its datastore drafter (RUN/datastore.safetensors); the "
                        "drafter's features are still recorded as the data is written, so a later run resumes")
    p.add_argument("--data", default=None, metavar="FILE.jsonl",
                   help='also train on your own text ({"text": ...} per line), labelled by the target')
    p.add_argument("--train-budget-s", type=float, default=None, help="size the schedule to this long")
    p.add_argument("--max-iters", type=int, default=None)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--gen-batch", type=int, default=None, help="rows decoding together while writing data")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens written per sequence")
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--layers", default=None, help="comma-separated drafter layer types (full_attention, "
                                                   "sliding_attention)")
    p.add_argument("--eval-prompts", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any TrainConfig field (JSON value), repeatable")
    p.add_argument("--ship", default=None, metavar="DIR",
                   help="after eval, copy the drafter + model card to DIR if, on the validation prompts, it beats "
                        "the untrained drafter and auto's variant beats prompt lookup alone")
    p.set_defaults(func=cmd_train)


def config_from(args):
    from .train import TrainConfig

    kw = {}
    names = {"model": "model", "out": "out", "dtype": "dtype", "seed": "seed", "data_budget_s": "data_budget_s",
             "train_budget_s": "train_budget_s", "data": "data_file", "max_iters": "max_iters", "epochs": "epochs",
             "gen_batch": "gen_batch", "new_tokens": "new_tokens", "hidden_size": "hidden_size",
             "eval_prompts": "eval_prompts", "threads": "threads"}
    for a, f in names.items():
        v = getattr(args, a, None)
        if v is not None:
            kw[f] = v
    if args.data_only:
        kw["data_only"] = True
    if args.layers:
        kw["layer_types"] = tuple(args.layers.split(","))
    fields = TrainConfig.__dataclass_fields__
    for item in args.set:
        k, _, v = item.partition("=")
        if k not in fields:
            raise ValueError(f"--set: unknown TrainConfig field {k!r}")
        try:
            kw[k] = json.loads(v)
        except json.JSONDecodeError:
            kw[k] = v
    if "layer_types" in kw:
        kw["layer_types"] = tuple(kw["layer_types"])
    return TrainConfig.quick_config(**kw) if args.quick else TrainConfig(**kw)


def cmd_train(args) -> int:
    from .train import run, ship

    cfg = config_from(args)
    if args.ship and cfg.data_only:
        raise ValueError("--ship needs a trained drafter: drop --data-only")
    res = run(cfg)
    print(json.dumps({n: {k: r[k] for k in ("tau", "acceptance_by_position", "decode_tokens_per_s",
                                            "greedy_equal_to_plain") if k in r}
                      for n, r in res["configs"].items()}, indent=1))
    if args.ship:
        ship(cfg, args.ship)
    return 0
