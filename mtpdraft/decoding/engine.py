"""Single-sequence decoding: one row of the shared decoding step (`step.Batch`).

Plain decoding is the same loop with no drafter (every cycle verifies zero draft
tokens), so both modes share the sampling, stop and budget logic and differ only
in how many positions each target forward checks.
"""

from __future__ import annotations

from typing import Iterator

from ..config import SamplingParams, SpecParams, Stats
from ..drafters.base import Drafter
from ..models.base import CausalLM
from .step import Batch, Row
from .stops import StopChecker


def eos_ids_of(model: CausalLM, tokenizer=None) -> set[int]:
    ids = set()
    cfg_eos = getattr(model.args, "eos_token_id", None)
    for src in (cfg_eos, getattr(tokenizer, "eos_token_id", None)):
        if src is not None:
            ids.update(src if isinstance(src, (list, tuple)) else [src])
    if tokenizer is not None:  # chat models end turns with their own marker
        for t in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>"):
            tid = tokenizer.convert_tokens_to_ids(t)
            if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
                ids.add(tid)
    return ids


def generate(model: CausalLM, prompt_ids: list[int], sp: SamplingParams | None = None, *,
             drafter: Drafter | None = None, spec: SpecParams | None = None, tokenizer=None,
             stats: Stats | None = None, max_len: int | None = None,
             stopper: StopChecker | None = None) -> Iterator[int]:
    """Yield generated token ids; fill `stats` as it goes.

    Greedy output is identical with and without a drafter; sampled output has the
    target's distribution either way. Generation ends at the stopper's conditions or
    when prompt + generated tokens fill `max_len` (reason "length").
    """
    sp = sp or SamplingParams()
    spec = spec or SpecParams()
    row = Row(list(prompt_ids), sp, stopper or StopChecker(sp, eos_ids_of(model, tokenizer), tokenizer),
              min(max_len or 8192, model.args.max_position_embeddings), drafter,
              spec.draft_len, spec.adaptive,
              stats=stats if stats is not None else Stats())
    # the cache holds what this request can write (its prompt and token budget), not the
    # whole context: zeroing 8192 positions of every layer costs tens of ms per call
    batch = Batch(model, 1, min(row.max_len, len(row.prompt) + row.stopper.sp.max_new_tokens + 1),
                  max_draft=row.draft_len)
    yield from batch.admit(row).tokens
    while not row.done:
        out = batch.step().rows[0]
        if out.error is not None:
            raise out.error
        yield from out.tokens


def generate_text(model: CausalLM, tokenizer, prompt: str, sp: SamplingParams | None = None, **kw):
    """Convenience: returns (text, token_ids, stats)."""
    sp = sp or SamplingParams()
    stats = Stats()
    stopper = StopChecker(sp, eos_ids_of(model, tokenizer), tokenizer)
    ids = tokenizer(prompt).input_ids
    out = list(generate(model, ids, sp, tokenizer=tokenizer, stats=stats, stopper=stopper, **kw))
    return stopper.text(), out, stats
