"""Stage 1: sequences written by the target itself.

Prompts are tokenized (BOS first) and decoded through the shared decoding step
(as the server decodes requests): each row is prefilled alone on its row of one
batch cache, then all rows decode together, one [B, 1] target forward per step.
Rows may have different prompt lengths: positions and attention are per row. Greedy rows take the
target's argmax (the labels the drafter must learn); sampled rows (temperature
> 0) add diversity and are labelled later by the target's argmax.
"""

from __future__ import annotations

import collections
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import SamplingParams
from ..decoding.step import Batch, Row
from ..decoding.stops import StopChecker
from ..models.base import CausalLM

PROMPTS_FILE = Path(__file__).resolve().parent.parent / "data" / "train_prompts.jsonl"
# a broader set written after the split of PROMPTS_FILE was fixed: training prompts only
EXTRA_PROMPTS_FILE = PROMPTS_FILE.with_name("train_extra_prompts.jsonl")


def read_texts(path: Path, what: str) -> list[tuple[int, str]]:
    """(line number, text) of each {"text": ...} line of a JSONL file, blank lines skipped;
    `what` names the file in errors (the --data file, a datastore's texts)."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} line {n}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str) or not rec["text"].strip():
            raise ValueError(f'{what} line {n}: expected an object with a non-empty "text" string')
        out.append((n, rec["text"]))
    return out


def load_prompts(path: str | Path | None = None) -> list[dict]:
    """The project-written prompt set: one {"id", "category", "prompt"} object per line."""
    path = Path(path) if path else PROMPTS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Two prompts share a passage when they share a run of PASSAGE_RUN words or a whole
# sentence of at least SENTENCE_WORDS words (lowercased, punctuation dropped); a run or
# sentence found in TEMPLATE_PROMPTS or more prompts of the corpus is an instruction
# template ("summarize the following text in one or two sentences"), not a passage.
PASSAGE_RUN = 7
SENTENCE_WORDS = 4
TEMPLATE_PROMPTS = 4


def encode_prompt(tok, text: str, chat: bool, max_tokens: int) -> list[int]:
    """A prompt's token ids, its text cut to max_tokens tokens: as one user message through
    the chat template (what a chat model is served), or as plain text (BOS first)."""
    if not chat:
        return tok(text).input_ids[:max_tokens]
    text = tok.decode(tok(text, add_special_tokens=False).input_ids[:max_tokens])
    msg = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return tok(msg, add_special_tokens=False).input_ids


def uses_chat(tok, chat: bool | None) -> bool:
    """chat None: the tokenizer's chat template when it has one."""
    has = bool(getattr(tok, "chat_template", None))
    if chat and not has:
        raise ValueError("chat formatting asked for, but the tokenizer has no chat template")
    return has if chat is None else bool(chat)


def prompt_text(p: dict) -> str:
    return p["prompt"] if "prompt" in p else "\n".join(p.get("turns", []))


def passage_runs(p: dict) -> set[str]:
    """The units two prompts may share: word runs, whole sentences, the whole prompt."""
    text = prompt_text(p).lower()
    words = re.findall(r"[a-z0-9]+", text)
    runs = {" ".join(words)}
    runs |= {" ".join(words[i:i + PASSAGE_RUN]) for i in range(len(words) - PASSAGE_RUN + 1)}
    for sentence in re.split(r"[.!?:;\n]", text):
        w = re.findall(r"[a-z0-9]+", sentence)
        if len(w) >= SENTENCE_WORDS:
            runs.add(" ".join(w))
    return runs


def _passages(prompts: list[dict]) -> list[set[str]]:
    """Each prompt's passage runs, the corpus's instruction templates removed."""
    runs = [passage_runs(p) for p in prompts]
    counts = collections.Counter(r for rs in runs for r in rs)
    return [{r for r in rs if counts[r] < TEMPLATE_PROMPTS} for rs in runs]


def shared_passages(a: list[dict], b: list[dict]) -> list[tuple[str, str]]:
    """(id in a, id in b) of every pair of prompts that share a passage."""
    runs = _passages(a + b)
    where: dict[str, list[str]] = {}
    for p, rs in zip(a, runs):
        for r in rs:
            where.setdefault(r, []).append(p["id"])
    return sorted({(i, q["id"]) for q, rs in zip(b, runs[len(a):]) for r in rs for i in where.get(r, [])})


def passage_groups(prompts: list[dict]) -> list[list[dict]]:
    """The prompts in groups that share passages (transitively); singletons included."""
    parent = list(range(len(prompts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, rs in enumerate(_passages(prompts)):
        for r in rs:
            parent[root(i)] = root(first.setdefault(r, i))
    groups: dict[int, list[dict]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(root(i), []).append(p)
    return list(groups.values())


def split_prompts(prompts: list[dict], heldout_frac: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic split stratified by category: (train, held-out = validation). Prompts
    that share a passage stay on one side. The held-out list interleaves the categories,
    so any prefix of it mixes them."""
    by_cat: dict[str, list[list[dict]]] = {}
    for g in passage_groups(prompts):
        by_cat.setdefault(g[0].get("category", ""), []).append(sorted(g, key=lambda p: p["id"]))
    rng = random.Random(seed)
    train, held_by_cat = [], []
    for cat in sorted(by_cat):
        groups = sorted(by_cat[cat], key=lambda g: g[0]["id"])
        rng.shuffle(groups)
        total = sum(len(g) for g in groups)
        want = max(1, round(total * heldout_frac)) if heldout_frac > 0 and len(groups) > 1 else 0
        held: list[dict] = []
        for g in groups:  # a group that would overshoot the held-out share goes to training
            (held if len(held) + len(g) <= want or (not held and want) else train).extend(g)
        held_by_cat.append(held)
    held = [h[i] for i in range(max((len(h) for h in held_by_cat), default=0)) for h in held_by_cat if i < len(h)]
    return train, held


def split_sets(prompts: list[dict], val_frac: float, eval_frac: float,
               seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, eval): three disjoint sets, stratified by category, prompts that
    share a passage on one side. Validation is for every choice (epochs, top-k, gates,
    which drafter `auto` runs); eval only for the reported figures."""
    rest, evals = split_prompts(prompts, eval_frac, seed)
    train, val = split_prompts(rest, val_frac / max(1e-9, 1 - eval_frac), seed + 1)
    return train, val, evals


def training_only(extra: list[dict], prompts: list[dict], held: list[dict]) -> list[dict]:
    """`extra` as training prompts beside the split `prompts`: ids must be new, and no extra
    prompt may share a passage with a held-out (validation or eval) prompt."""
    ids = {p["id"] for p in prompts}
    dup = sorted({p["id"] for p in extra if p["id"] in ids} | {i for i, n in
                 collections.Counter(p["id"] for p in extra).items() if n > 1})
    if dup:
        raise ValueError(f"extra training prompts reuse prompt ids: {dup[:5]}")
    shared = shared_passages(extra, held)
    if shared:
        raise ValueError(f"extra training prompts share passages with held-out prompts: {shared[:5]}")
    return extra


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
def generate_batch(model: CausalLM, jobs: list[Job], eos_ids: set[int], max_rows: int | None = None,
                   record: list[int] | None = None) -> list:
    """Write one sequence per job (prompt + continuation, ending after the first EOS
    or after its new_tokens), in the jobs' order.

    The rows go through the shared decoding step (`decoding.step.Batch`), at most
    `max_rows` at a time (default: all): each is prefilled alone, all decode together
    one position per forward, and a finished row's cache row takes the next job.

    record: target layers whose K/V to keep. Then each result is (tokens, recorded): per
    position of the sequence but its last (the one position never run), the target's final
    hidden state and those layers' cached K/V as this decoding computed them, and from
    the last prompt position on the target's argmax where the row sampled (-1 where it
    decoded greedily). `features.recorded_features` turns them into the drafter's features
    without a second forward over the text.
    """
    if not jobs:
        return []
    max_rows = min(len(jobs), max_rows or len(jobs))
    batch = Batch(model, max_rows, max(len(j.prompt) + j.new_tokens for j in jobs) + 1)
    greedy = {}  # row -> its greedy settings, once its sampled tokens are written
    todo, job_of, seqs = list(enumerate(jobs)), {}, [None] * len(jobs)

    def finish(row: Row) -> None:
        i = job_of.pop(row)
        seqs[i] = row.tokens
        if record is not None:
            n = len(row.tokens) - 1  # positions run through the target (the cache may hold more
            slot = batch.rows.index(row)  # when a stop cut accepted tokens; plain decoding: exactly n)
            kv = []
            for li in record:
                lc = batch.cache.layers[li]
                if n > lc.capacity:
                    raise ValueError(f"layer {li} keeps {lc.capacity} positions, the sequence has {n}")
                kv.append(tuple(t.clone() for t in lc.keys_at(slot, torch.arange(n))))
            seqs[i] = (row.tokens, dict(hidden=torch.cat(row.states)[:n], kv=kv,
                                        argmax=row.argmax[:n - len(row.prompt) + 1]))
        batch.release(row)

    while todo or batch.rows:
        while todo and len(batch.rows) < max_rows:
            i, j = todo.pop(0)
            stop_sp = SamplingParams(max_new_tokens=j.new_tokens)
            sampled = j.temperature > 0 and j.sample_first != 0
            sp = SamplingParams(max_new_tokens=j.new_tokens, temperature=j.temperature, seed=j.seed) if sampled else stop_sp
            row = Row(list(j.prompt), sp, StopChecker(stop_sp, eos_ids), batch.cache.max_len, record=record is not None)
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
