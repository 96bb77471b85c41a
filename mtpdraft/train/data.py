"""Stage 1: sequences written by the target itself.

Prompts are tokenized (BOS first), each row is prefilled alone on a B=1 view of
its row of one shared batch cache (as the server admits requests), then all rows
decode together, one [B, 1] target forward per step. Rows may have different
prompt lengths: positions and attention are per row. Greedy rows take the
target's argmax (the labels the drafter must learn); sampled rows (temperature
> 0) add diversity and are labelled later by the target's argmax.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import kernels
from ..models.base import CausalLM

PROMPTS_FILE = Path(__file__).resolve().parent.parent / "data" / "train_prompts.jsonl"


def load_prompts(path: str | Path | None = None) -> list[dict]:
    """The project-written prompt set: one {"id", "category", "prompt"} object per line."""
    path = Path(path) if path else PROMPTS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def split_prompts(prompts: list[dict], heldout_frac: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic split stratified by category: (train, held-out). The held-out
    list interleaves the categories, so any prefix of it mixes them."""
    by_cat: dict[str, list[dict]] = {}
    for p in prompts:
        by_cat.setdefault(p.get("category", ""), []).append(p)
    rng = random.Random(seed)
    train, held_by_cat = [], []
    for cat in sorted(by_cat):
        items = sorted(by_cat[cat], key=lambda p: p["id"])
        rng.shuffle(items)
        n = max(1, round(len(items) * heldout_frac)) if heldout_frac > 0 and len(items) > 1 else 0
        held_by_cat.append(items[:n])
        train += items[n:]
    held = [h[i] for i in range(max((len(h) for h in held_by_cat), default=0)) for h in held_by_cat if i < len(h)]
    return train, held


@dataclass
class Job:
    """One sequence to write. The first `sample_first` new tokens are sampled at
    `temperature` (-1: every token; 0: none), the rest are the target's argmax."""
    prompt: list[int]
    new_tokens: int
    temperature: float = 0.0
    seed: int = 0
    source: str = ""
    sample_first: int = 0


@torch.inference_mode()
def generate_batch(model: CausalLM, jobs: list[Job], eos_ids: set[int], fast_head: bool = False) -> list[list[int]]:
    """Write one sequence per job (prompt + continuation, cut after the first EOS).

    All rows decode in lock-step for max(new_tokens) steps; a row stops being
    extended once it has its tokens or wrote EOS (its later tokens are dropped).
    fast_head: argmax of a bf16 x bf16 head (oneDNN) instead of the runtime's
    fp32-activation kernels; only for throughput experiments, the default keeps
    the exact decoding numerics.
    """
    B = len(jobs)
    steps = max(j.new_tokens for j in jobs)
    max_len = max(len(j.prompt) for j in jobs) + steps + 1
    cache = model.new_cache(B, max_len, max_chunk=max(64, min(512, max(len(j.prompt) for j in jobs))))
    gens = [torch.Generator().manual_seed(j.seed) for j in jobs]
    seqs = [list(j.prompt) for j in jobs]
    last = torch.empty(B, 1, dtype=torch.long)

    def pick(i: int, logits: torch.Tensor) -> int:
        j = jobs[i]
        n = len(seqs[i]) - len(j.prompt)  # index of the token being chosen
        if j.temperature <= 0 or j.sample_first == 0 or 0 < j.sample_first <= n:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / j.temperature, -1)
        return int(torch.multinomial(probs, 1, generator=gens[i]))

    head = kernels.dense(model.head_weight).to(torch.bfloat16) if fast_head else None
    for i, j in enumerate(jobs):  # per-row prefill on the B=1 view of row i
        view = cache.rows(i, i + 1)
        out = model.prefill(torch.tensor([j.prompt]), view)
        cache.lengths[i] = view.lengths[0]
        last[i, 0] = pick(i, out.logits[0, -1])
    done = [False] * B
    for s in range(steps):
        for i in range(B):
            if not done[i]:
                seqs[i].append(int(last[i, 0]))
                if int(last[i, 0]) in eos_ids or len(seqs[i]) - len(jobs[i].prompt) >= jobs[i].new_tokens:
                    done[i] = True
        if all(done) or s == steps - 1:
            break
        if fast_head:
            h = model(last, cache, logits="none").hidden[:, 0]
            logits = torch.nn.functional.linear(h.to(torch.bfloat16), head).float()
        else:
            logits = model(last, cache, logits="all").logits[:, 0]
        for i in range(B):
            last[i, 0] = pick(i, logits[i])
    return seqs
