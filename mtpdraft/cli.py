"""Command line: `mtpdraft generate | models` (bench, serve and train join as they land)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .cliargs import add_model_args
from .config import DEFAULT_SAMPLING


def _spec_from(args):
    from .config import SpecParams

    return SpecParams(**({"draft_len": args.draft_len} if args.draft_len else {}), adaptive=args.adaptive)


def cmd_generate(args) -> int:
    from . import load
    from .config import SamplingParams, Stats
    from .decoding.engine import eos_ids_of, generate
    from .decoding.stops import StopChecker
    from .drafters import make_drafter

    sp = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, stop=tuple(args.stop or ()))
    spec = _spec_from(args)
    t0 = time.perf_counter()
    model, tok = load(args.model, args.dtype)
    drafter = make_drafter(args.drafter, model, model.name)
    load_s = time.perf_counter() - t0
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"model {model.name} has no chat template; drop --chat to use the raw prompt")
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt).input_ids
    stats = Stats()
    stopper = StopChecker(sp, eos_ids_of(model, tok), tok)
    printed = 0
    # a stop string may be streaming in: hold back what could be its start
    holdback = max((len(s) for s in sp.stop), default=1) - 1
    for _ in generate(model, ids, sp, drafter=drafter, spec=spec, tokenizer=tok, stats=stats, stopper=stopper):
        if not args.json:
            text = tok.decode(stopper.ids, skip_special_tokens=True)
            safe = len(text) - holdback
            if safe > printed and not text[:safe].endswith("\ufffd"):  # not half a UTF-8 character
                sys.stdout.write(text[printed:safe])
                sys.stdout.flush()
                printed = safe
    text = stopper.text()
    if args.json:
        d = stats.as_dict()
        d.update(text=text, token_ids=stopper.ids, num_tokens=len(stopper.ids), model=model.name,
                 drafter=args.drafter, dtype=args.dtype, weights=model.weights_format,
                 weight_bytes=model.weight_bytes(), finish_reason=stopper.reason, load_s=round(load_s, 3))
        print(json.dumps(d))
    else:
        sys.stdout.write(text[printed:] + "\n")
        print(f"[{len(stopper.ids)} tokens, {stats.tokens_per_s:.1f} tok/s decode, "
              f"{stats.mean_accepted_tokens:.2f} tokens/cycle, drafter={args.drafter}, weights={model.weights_format}]",
              file=sys.stderr)
    return 0


def cmd_models(args) -> int:
    from .drafters import shipped_drafter_dir
    from .registry import BUNDLED, DEFAULT_MODEL, converted_dir, is_converted

    from .models import quant_summary

    for name, b in BUNDLED.items():
        state = f"converted ({converted_dir(name)})" if is_converted(name) else "not converted yet"
        drafter = "shipped drafter" if shipped_drafter_dir(name) else "no shipped drafter"
        default = " [default]" if name == DEFAULT_MODEL else ""
        weights = ""
        if is_converted(name):
            q = quant_summary(converted_dir(name))
            weights = f"; default weights: the GGUF's {q[0]} blocks, {q[1] / 2**20:.0f} MiB" if q else ""
        print(f"{name}{default}: {b.description}; {state}{weights}; {drafter}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mtpdraft", description="Lossless speculative decoding with MTP drafters")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("prompt")
    add_model_args(g)
    g.add_argument("--max-new-tokens", type=int, default=DEFAULT_SAMPLING.max_new_tokens)
    g.add_argument("--temperature", type=float, default=DEFAULT_SAMPLING.temperature)
    g.add_argument("--top-k", type=int, default=DEFAULT_SAMPLING.top_k)
    g.add_argument("--top-p", type=float, default=DEFAULT_SAMPLING.top_p)
    g.add_argument("--seed", type=int, default=DEFAULT_SAMPLING.seed)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    g.set_defaults(func=cmd_generate)
    m = sub.add_parser("models", help="list bundled models")
    m.set_defaults(func=cmd_models)
    # subcommands defined in their own packages register here (one line each)
    from .serve.command import add_parser as _serve; _serve(sub)  # noqa: E702
    from .bench.command import add_parser as _bench; _bench(sub)  # noqa: E702
    from .train.command import add_parser as _train; _train(sub)  # noqa: E702
    from .drafters.export import add_parser as _export; _export(sub)  # noqa: E702
    from .drafters.datastore import add_parser as _datastore; _datastore(sub)  # noqa: E702
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"mtpdraft: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
