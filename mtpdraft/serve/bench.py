"""Serving benchmark: aggregate tokens/s and per-request latency at several client concurrencies,
with speculation on and off (per-request `speculative` flag, same server).

    python -m mtpdraft.serve.bench --model gemma-3-270m --drafter ngram --concurrency 1 4 8

Starts the server in-process on 127.0.0.1 (or use --url for a running one) and drives it with
streaming httpx clients; each client sends --requests requests back to back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time

from ..cliargs import add_model_args
from ..config import SERVE_DRAFT_LEN, SERVE_MAX_BATCH

PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "def factorial(n):\n",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick",
    "List of the planets of the solar system, in order: Mercury, Venus, Earth, Mars,",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "<table><tr><td>1</td><td>one</td></tr><tr><td>2</td><td>two</td></tr><tr><td>3</td>",
    "Question: What is the capital of France?\nAnswer: Paris.\nQuestion: What is the capital of Italy?\nAnswer:",
    "import numpy as np\nimport torch\nimport torch.nn as nn\n\nclass MLP(nn.Module):\n    def __init__(self",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. January, February, March,",
]


def start_server(args):
    import uvicorn

    from . import build_app

    app, engine = build_app(args.model, drafter=args.drafter, dtype=args.dtype, max_batch=args.max_batch,
                            max_context=args.max_context, draft_len=args.draft_len, adaptive=args.adaptive,
                            spec_off_batch=args.spec_off_batch)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, th


async def client(h, model, cid, n_req, max_tokens, spec, out):
    for j in range(n_req):
        body = {"model": model, "prompt": PROMPTS[(cid * n_req + j) % len(PROMPTS)], "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "ignore_eos": True, "speculative": spec}
        t0 = time.perf_counter()
        ttft, ext = None, {}
        async with h.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                if ttft is None:
                    ttft = time.perf_counter() - t0
                ext = d.get("mtpdraft", ext)
        out.append({"latency": time.perf_counter() - t0, "ttft": ttft, "tokens": ext.get("num_tokens", 0),
                    "tau": ext.get("mean_accepted_tokens", 0.0)})


async def run_level(url, model, conc, n_req, max_tokens, spec):
    import httpx

    out: list[dict] = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as h:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(h, model, c, n_req, max_tokens, spec, out) for c in range(conc)])
        wall = time.perf_counter() - t0
    toks = sum(o["tokens"] for o in out)
    lat = sorted(o["latency"] for o in out)
    return {"concurrency": conc, "speculative": spec, "requests": len(out), "tokens": toks,
            "wall_s": round(wall, 2), "agg_tok_s": round(toks / wall, 2),
            "lat_mean_s": round(statistics.mean(lat), 3), "lat_p50_s": round(lat[len(lat) // 2], 3),
            "lat_max_s": round(lat[-1], 3), "ttft_mean_s": round(statistics.mean(o["ttft"] for o in out), 3),
            "per_req_tok_s": round(statistics.mean(o["tokens"] / o["latency"] for o in out), 2),
            "tau": round(statistics.mean(o["tau"] for o in out), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    # the server's own model, weights and draft-length defaults (drafter: ngram unless asked)
    add_model_args(ap, drafter="ngram", draft_len=SERVE_DRAFT_LEN)
    ap.add_argument("--max-batch", type=int, default=SERVE_MAX_BATCH)
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--spec-off-batch", type=int, default=0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    server = None
    if args.url:
        import httpx

        url = args.url
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    else:
        url, server, th = start_server(args)
        from .. import resolve

        model = resolve(args.model)[0]
    # warm-up (kernel load, allocator)
    asyncio.run(run_level(url, model, 1, 1, 8, True))
    rows = []
    for conc in args.concurrency:
        for spec in (True, False):
            r = asyncio.run(run_level(url, model, conc, args.requests, args.max_tokens, spec))
            rows.append(r)
            print(json.dumps(r) if args.json else
                  f"conc={r['concurrency']:2d} spec={'on ' if spec else 'off'} reqs={r['requests']:3d} "
                  f"tokens={r['tokens']:5d} wall={r['wall_s']:7.2f}s agg={r['agg_tok_s']:7.2f} tok/s "
                  f"per-req={r['per_req_tok_s']:6.2f} tok/s lat mean={r['lat_mean_s']:.2f}s p50={r['lat_p50_s']:.2f}s "
                  f"max={r['lat_max_s']:.2f}s ttft={r['ttft_mean_s']:.2f}s tau={r['tau']:.2f}", flush=True)
    if server is not None:
        server.should_exit = True
        th.join(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
