"""Stage 1: sequences written by the target itself.

Prompts are tokenized (BOS first) and decoded through the shared decoding step
(as the server decodes requests): each row is prefilled alone on its row of one
batch cache, then all rows decode together, one [B, 1] target forward per step.
Rows may have different prompt lengths: positions and attention are per row. Greedy rows take the
target's argmax (the labels the drafter must learn); sampled rows (temperature
> 0) add diversity and are labelled later by the target's argmax.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import SamplingParams
from ..decoding.step import Batch, Row
from ..decoding.stops import StopChecker
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
def generate_batch(model: CausalLM, jobs: list[Job], eos_ids: set[int], max_rows: int | None = None) -> list[list[int]]:
    """Write one sequence per job (prompt + continuation, ending after the first EOS
    or after its new_tokens), in the jobs' order.

    The rows go through the shared decoding step (`decoding.step.Batch`), at most
    `max_rows` at a time (default: all): each is prefilled alone, all decode together
    one position per forward, and a finished row's cache row takes the next job.
    """
    if not jobs:
        return []
    max_rows = min(len(jobs), max_rows or len(jobs))
    batch = Batch(model, max_rows, max(len(j.prompt) + j.new_tokens for j in jobs) + 1)
    greedy = {}  # row -> its greedy settings, once its sampled tokens are written
    todo, job_of, seqs = list(enumerate(jobs)), {}, [None] * len(jobs)

    def finish(row: Row) -> None:
        seqs[job_of.pop(row)] = row.tokens
        batch.release(row)

    while todo or batch.rows:
        while todo and len(batch.rows) < max_rows:
            i, j = todo.pop(0)
            stop_sp = SamplingParams(max_new_tokens=j.new_tokens)
            sampled = j.temperature > 0 and j.sample_first != 0
            sp = SamplingParams(max_new_tokens=j.new_tokens, temperature=j.temperature, seed=j.seed) if sampled else stop_sp
            row = Row(list(j.prompt), sp, StopChecker(stop_sp, eos_ids), batch.cache.max_len)
            job_of[row] = i
            if j.sample_first > 0:
                greedy[row] = (j.sample_first, stop_sp)
            batch.admit(row)
            if row.done:
                finish(row)
        for row in batch.rows:  # the first sample_first tokens sampled, the rest the target's argmax
            if row in greedy and len(row.stopper.ids) >= greedy[row][0]:
                row.sp = greedy.pop(row)[1]
        if not batch.rows:
            continue
        for e in batch.step().rows:
            if e.error is not None:
                raise e.error
            if e.row.done:
                finish(e.row)
    return seqs
