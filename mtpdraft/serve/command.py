"""`mtpdraft serve`: argument parsing and the uvicorn launch."""

from __future__ import annotations

import argparse

from ..cliargs import add_model_args
from ..config import (SERVE_DEFAULT_MAX_TOKENS, SERVE_DRAFT_LEN, SERVE_HOST, SERVE_MAX_BATCH, SERVE_MAX_CONTEXT,
                      SERVE_MAX_QUEUE, SERVE_PORT, SERVE_SHUTDOWN_TIMEOUT_S, SERVE_SPEC_OFF_BATCH)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with batched speculative decoding")
    add_model_args(p, draft_len=SERVE_DRAFT_LEN, adaptive_help="adapt each request's draft length to its acceptance")
    p.add_argument("--host", default=SERVE_HOST)
    p.add_argument("--port", type=int, default=SERVE_PORT)
    p.add_argument("--max-batch", type=int, default=SERVE_MAX_BATCH, help="rows decoded together (1..64)")
    p.add_argument("--max-context", type=int, default=SERVE_MAX_CONTEXT, help="prompt + generated tokens per request")
    p.add_argument("--spec-off-batch", type=int, default=SERVE_SPEC_OFF_BATCH,
                   help=f"switch drafting off while the batch has at least this many rows (0 = never; "
                        f"default {SERVE_SPEC_OFF_BATCH}: "
                        "on gemma-3-270m, 2 CPU cores, verifying drafts for 4+ rows cost more than it saved); "
                        "independently, a batch of B rows drafts at most 64//B - 1 tokens per row")
    p.add_argument("--max-queue", type=int, default=SERVE_MAX_QUEUE, help="requests waiting for a row before 429s")
    p.add_argument("--default-max-tokens", type=int, default=SERVE_DEFAULT_MAX_TOKENS,
                   help="max_tokens for /v1/completions requests that give none (chat: the rest of the context)")
    p.add_argument("--shutdown-timeout", type=float, default=SERVE_SHUTDOWN_TIMEOUT_S,
                   help="seconds in-flight requests get to finish on shutdown before they are cancelled")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from . import build_app

    app, engine = build_app(args.model, drafter=args.drafter, dtype=args.dtype, max_batch=args.max_batch,
                            max_context=args.max_context, draft_len=args.draft_len, adaptive=args.adaptive,
                            max_queue=args.max_queue, spec_off_batch=args.spec_off_batch,
                            default_max_tokens=args.default_max_tokens, shutdown_timeout=args.shutdown_timeout)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=int(args.shutdown_timeout) + 1)
    return 0
