"""The decoding loop: prefill, then cycles of draft -> verify -> commit.

Plain decoding is the same loop with no drafter (every cycle verifies zero draft
tokens), so both modes share the sampling, stop and budget logic and differ only
in how many positions each target forward checks.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from ..config import SamplingParams, SpecParams, Stats
from ..drafters.base import Draft, DraftContext, Drafter
from ..models.base import CausalLM
from .penalties import adjust_logits
from .stops import StopChecker
from .verify import verify


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
    """Yield generated token ids one by one; fill `stats` as it goes.

    Greedy output is identical with and without a drafter; sampled output has the
    target's distribution either way. Generation ends at the stopper's conditions or
    when prompt + generated tokens fill `max_len` (reason "length").
    """
    sp = sp or SamplingParams()
    spec = spec or SpecParams()
    stats = stats if stats is not None else Stats()
    stopper = stopper or StopChecker(sp, eos_ids_of(model, tokenizer), tokenizer)
    if not prompt_ids:
        raise ValueError("empty prompt: give at least one token (e.g. BOS)")
    max_len = max_len or min(8192, model.args.max_position_embeddings)
    if len(prompt_ids) >= max_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the context of {max_len} tokens")
    gen = torch.Generator().manual_seed(sp.seed) if sp.seed is not None else None
    k_max = spec.draft_len if drafter is not None else 0
    cache = model.new_cache(1, max_len, max_chunk=max(256, k_max + 1))
    tokens = list(prompt_ids)
    stats.prompt_tokens = len(tokens)

    # prefill: the prompt's last position gives the first token
    t0 = time.perf_counter()
    out = model.prefill(torch.tensor([tokens]), cache)
    logits = adjust_logits(out.logits[0, -1:], [], [], sp)
    _, nxt = verify(torch.empty(0, dtype=torch.long), None, logits, sp, gen)
    hidden = out.hidden[0, -1]
    t1 = time.perf_counter()
    stats.prefill_s += t1 - t0
    tokens.append(nxt)
    stats.tokens += 1
    yield nxt
    if stopper.add(nxt) or _context_full(stopper, tokens, max_len):
        return

    k = k_max
    while True:
        start = time.perf_counter()
        # draft: never past the token budget or the context
        room = min(sp.max_new_tokens - len(stopper.ids) - 1, max_len - cache.lengths[0] - 1)
        draft = Draft([])
        if drafter is not None and min(k, room) > 0:
            draft = drafter.propose(DraftContext(tokens, hidden, model, cache, 0, sp, gen), min(k, room))
        t_draft = time.perf_counter()

        # verify: one target forward over [last token] + draft
        base = cache.lengths[0]
        inp = torch.tensor([[tokens[-1]] + draft.tokens])
        out = model(inp, cache, logits="all")
        d = torch.tensor(draft.tokens, dtype=torch.long)
        logits = adjust_logits(out.logits[0], stopper.ids, draft.tokens, sp)
        n_acc, nxt = verify(d, draft.probs, logits, sp, gen)

        # commit: keep the last token and the accepted drafts, roll the rest back
        cache.truncate(0, base + 1 + n_acc)
        hidden = out.hidden[0, n_acc]
        emitted = draft.tokens[:n_acc] + [nxt]
        now = time.perf_counter()
        stats.draft_s += t_draft - start
        stats.verify_s += now - t_draft
        stats.decode_s += now - start
        stats.cycles += 1
        stats.record(len(draft.tokens), n_acc)
        if drafter is not None:
            drafter.observe(n_acc, len(draft.tokens))
            if spec.adaptive:
                k = min(k_max, k + 1) if n_acc == len(draft.tokens) else max(1, n_acc + 1)
        for t in emitted:
            tokens.append(t)
            stats.tokens += 1
            stats.decode_tokens += 1
            yield t
            if stopper.add(t) or _context_full(stopper, tokens, max_len):
                return


def _context_full(stopper: StopChecker, tokens: list[int], max_len: int) -> bool:
    if len(tokens) < max_len:
        return False
    stopper.finish("length")
    return True


def generate_text(model: CausalLM, tokenizer, prompt: str, sp: SamplingParams | None = None, **kw):
    """Convenience: returns (text, token_ids, stats)."""
    sp = sp or SamplingParams()
    stats = Stats()
    stopper = StopChecker(sp, eos_ids_of(model, tokenizer), tokenizer)
    ids = tokenizer(prompt).input_ids
    out = list(generate(model, ids, sp, tokenizer=tokenizer, stats=stats, stopper=stopper, **kw))
    return stopper.text(), out, stats
