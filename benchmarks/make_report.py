"""Regenerate BENCHMARKS.md: run every benchmark on this machine and write its output.

    python benchmarks/make_report.py                 # everything (~20-30 min on 2 cores)
    python benchmarks/make_report.py --limit 9       # fewer prompts per bench run

Each section records the exact command and its output. Speeds are compared as
ratios measured interleaved within one run; absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"


def run(cmd: list[str]) -> tuple[str, str]:
    shown = " ".join(c if " " not in c else repr(c) for c in cmd)
    shown = shown.replace(sys.executable, "python").replace(f"{ROOT}/", "")
    print(f"$ {shown}", file=sys.stderr, flush=True)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-3000:])
        raise SystemExit(f"benchmark failed ({p.returncode}): {shown}")
    return shown, p.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=18, help="prompts per `mtpdraft bench` run")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--skip-llamacpp", action="store_true", help="skip the llama.cpp comparison (builds it once)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    py, cli = sys.executable, [sys.executable, "-m", "mtpdraft.cli"]
    n, limit = str(args.max_new_tokens), str(args.limit)
    sections = []

    for dtype in ("auto", "bf16"):
        cmd, out = run([py, "benchmarks/runtime.py", "--dtype", dtype, "--max-new-tokens", "64"])
        what = "the GGUF's own quantized blocks (default)" if dtype == "auto" else "bf16 weights"
        sections.append((f"Runtime, {what}: decode step vs the weight-read bound, forward over n positions, "
                         "plain decoding vs transformers", cmd, "```json\n" + out.strip() + "\n```"))
    cmd, out = run([py, "benchmarks/sampling.py", "--max-new-tokens", "128", "--rounds", "3"])
    sections.append(("Sampling cost: plain decoding at temperature 0.7 / top-p 0.95 vs greedy (default weights)", cmd,
                     "```json\n" + out.strip() + "\n```"))
    cmd, out = run([py, "benchmarks/weights.py", "--formats", "auto,q8_0,bf16", "--rounds", "2"])
    sections.append(("Weight formats: resident memory and plain decode speed (fresh process per format)", cmd,
                     "```json\n" + out.strip() + "\n```"))
    if not args.skip_llamacpp:
        cmd, out = run([py, "benchmarks/llamacpp.py", "--limit", str(min(args.limit, 12)), "--threads", "1,2",
                        "--max-new-tokens", n])
        sections.append(("mtpdraft vs llama.cpp on the same GGUF file (plain and n-gram speculation, 1 and 2 threads)",
                         cmd, "```json\n" + out.strip() + "\n```"))

    from mtpdraft.bench import machine_info
    from mtpdraft.drafters import shipped_drafter_dir

    drafters = ["ngram"] + (["auto"] if shipped_drafter_dir("gemma-3-270m") else [])
    for d in drafters:
        tag = "mtp" if d == "auto" else d
        base = cli + ["bench", "--model", "gemma-3-270m", "--drafter", d, "--limit", limit, "--max-new-tokens", n,
                      "--no-progress"]
        extra = ["--compare", "hf"] if d == "ngram" else []
        cmd, _ = run(base + extra + ["--json", f"{OUT}/bench_{tag}.json", "--report", f"{OUT}/bench_{tag}.md",
                                     "--plot", f"{OUT}/bench_{tag}.png"])
        rel = f"benchmarks/results/bench_{tag}.png"
        sections.append((f"`mtpdraft bench`, drafter {d} (greedy, default weights)", cmd,
                         Path(f"{OUT}/bench_{tag}.md").read_text() + f"\n![speedup per category]({rel})\n"))
    if shipped_drafter_dir("smollm2-135m-instruct"):  # the chat model: prompts through its chat template
        cmd, _ = run(cli + ["bench", "--model", "smollm2-135m-instruct", "--drafter", "auto", "--limit", limit,
                            "--max-new-tokens", n, "--no-progress", "--json", f"{OUT}/bench_auto_smollm2.json",
                            "--report", f"{OUT}/bench_auto_smollm2.md"])
        sections.append(("`mtpdraft bench`, smollm2-135m-instruct, drafter auto (greedy, chat template, default weights)",
                         cmd, Path(f"{OUT}/bench_auto_smollm2.md").read_text()))
    cmd, _ = run(cli + ["bench", "--model", "gemma-3-270m", "--drafter", "ngram", "--adaptive", "--limit", limit,
                        "--max-new-tokens", n, "--no-progress", "--json", f"{OUT}/bench_ngram_adaptive.json"])
    fixed = json.loads(Path(f"{OUT}/bench_ngram.json").read_text())
    adapt = json.loads(Path(f"{OUT}/bench_ngram_adaptive.json").read_text())
    sections.append((f"Draft length: fixed k={fixed['draft_len']} vs adaptive (n-gram drafter)", cmd,
                     "| policy | speedup over plain (same run) | mean accepted tokens |\n|---|---|---|\n"
                     f"| fixed k={fixed['draft_len']} | {fixed['speedup']:.2f}x | {fixed['speculative']['mean_accepted_tokens']:.2f} |\n"
                     f"| adaptive | {adapt['speedup']:.2f}x | {adapt['speculative']['mean_accepted_tokens']:.2f} |\n"))

    if not args.skip_serve:
        cmd, out = run([py, "-m", "mtpdraft.serve.bench", "--model", "gemma-3-270m", "--drafter", "auto",
                        "--concurrency", "1", "4", "8", "--requests", "3", "--max-tokens", "64"])
        sections.append(("Server: aggregate throughput and latency at 1, 4, 8 concurrent clients (default weights, `--drafter auto`, the server's draft length 4; drafting forced on at every batch size with `--spec-off-batch 0`, to show where it stops paying; `mtpdraft serve` turns drafting off at 4+ rows by default)", cmd,
                         "```\n" + out.strip() + "\n```"))

    import torch

    head = ["# Benchmarks", "",
            "Regenerated by `python benchmarks/make_report.py` (do not edit by hand).", "",
            f"- date: {datetime.date.today().isoformat()}",
            f"- machine: {machine_info()['cpu']}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}",
            "- model: gemma-3-270m (bundled Q4_K_M GGUF); default weights = the file's own quantized blocks "
            "(Q8_0/Q5_0/Q4_K/Q6_K, activations quantized per row to int8 in blocks of 32, fp32 accumulation); "
            "the bf16 sections dequantize them; one section runs smollm2-135m-instruct (bundled Q4_1/Q8_0 GGUF)", ""]
    body = []
    for title, cmd, text in sections:
        body += [f"## {title}", "", "```bash", cmd, "```", "", text.strip(), ""]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(head + body))
    print("wrote BENCHMARKS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
