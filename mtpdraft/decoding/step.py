"""The one decoding step: prefill, then cycles of draft -> verify -> commit, for a batch.

Every caller decodes through a `Batch`: `generate()` (one row), the server's
continuous batching and the training-data writer (many rows). A Batch owns one KV
cache whose active rows are rows 0..n-1 (compacted when a row leaves).

* `admit(row)` prefills a row alone on its own cache row, in the same chunks for
  every caller, so its first token and cache are those of single-sequence decoding.
* `step()` drafts for every row (each row's drafter on a one-row view of its cache
  row), pads the drafts to the longest, verifies every row with ONE target forward
  and commits each row's accepted prefix plus the target's own token; rejected drafts
  and padding are rolled back (attention is causal, the kernels are row-invariant).
* Failures are per row: a row whose draft or verification raises gets its exception
  in its result; if the batched forward raises, each row is retried alone.

Plain decoding is the same step with no drafter (every cycle verifies zero drafts).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from ..config import SamplingParams, Stats
from ..drafters.base import Draft, DraftContext, Drafter
from ..drafters.combined import draft_len_for, for_request
from ..models.base import CausalLM
from .penalties import adjust_logits
from .stops import StopChecker
from .verify import verify

log = logging.getLogger("mtpdraft.decoding")

PREFILL_CHUNK = 256  # prompt positions per prefill forward (chunking changes the numerics: one value for all)
HEAD_SLICE = 32  # prompt logprobs: positions per head matmul (bounds the [n, V] logits)

# One logprob entry per token: (token id, logprob, [(id, logprob) of the top_n best]).
Logprob = tuple[int, float, list[tuple[int, float]]]


@dataclass(eq=False)
class Row:
    """One sequence being decoded: its settings and its state between steps.

    sp: the sampling settings of the target's choice (may change between steps);
    stopper: EOS / stop strings / token budget (its own settings); max_len: prompt +
    generated tokens at most (reaching it finishes with reason "length").
    logprobs: None = off, else how many alternatives per token (the target's
    log-softmax of its raw logits); prompt_logprobs: also score the prompt's tokens.
    """

    prompt: list[int]
    sp: SamplingParams
    stopper: StopChecker
    max_len: int
    drafter: Drafter | None = None
    draft_len: int | None = None  # None: the drafter's own (auto's), else DEFAULT_DRAFT_LEN; resolved below
    adaptive: bool = False
    logprobs: int | None = None
    prompt_logprobs: bool = False
    # keep, per cached position, the target's final hidden state and, where the row
    # samples its argmax: the drafter trainer's features, written as the data is (train.data)
    record: bool = False
    stats: Stats = field(default_factory=Stats)
    # state
    tokens: list[int] = field(init=False)  # prompt + committed tokens; the last is not yet in the cache
    hidden: torch.Tensor | None = field(init=False, default=None)  # target's final hidden at the last cached position
    k: int = field(init=False)  # the current draft length
    gen: torch.Generator | None = field(init=False)
    token_logprobs: list[Logprob] = field(init=False, default_factory=list)
    prompt_token_logprobs: list[Logprob] = field(init=False, default_factory=list)  # from the 2nd prompt token
    states: list[torch.Tensor] = field(init=False, default_factory=list)  # record: hidden [n, D] per forward
    argmax: list[int] = field(init=False, default_factory=list)  # record: from the last prompt position on (-1: greedy)

    def __post_init__(self):
        if not self.prompt:
            raise ValueError("empty prompt: give at least one token (e.g. BOS)")
        if len(self.prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(self.prompt)} tokens does not fit the context of {self.max_len} tokens")
        self.tokens = list(self.prompt)
        self.drafter = for_request(self.drafter, self.sp)  # None where auto drafts nothing at this temperature
        self.draft_len = draft_len_for(self.drafter, self.sp, self.draft_len)
        self.k = self.draft_len
        self.gen = torch.Generator().manual_seed(self.sp.seed) if self.sp.seed is not None else None
        self.stats.prompt_tokens = len(self.prompt)

    @property
    def done(self) -> bool:
        return self.stopper.reason is not None

    def _commit(self, toks: list[int], lps: list[Logprob] | None) -> tuple[list[int], list[Logprob] | None]:
        """Append tokens one at a time through the stop checker and the context limit."""
        kept = []
        for t in toks:
            self.tokens.append(t)
            kept.append(t)
            if self.stopper.add(t):
                break
            if len(self.tokens) >= self.max_len:
                self.stopper.finish("length")
                break
        self.stats.tokens += len(kept)
        if lps is not None:
            lps = lps[:len(kept)]
            self.token_logprobs += lps
        return kept, lps


@dataclass
class Emitted:
    """What one row committed in one call (tokens cut at its stop)."""

    row: Row
    tokens: list[int]
    logprobs: list[Logprob] | None = None
    proposed: int = 0
    accepted: int = 0
    error: Exception | None = None


@dataclass
class StepOut:
    rows: list[Emitted]  # in the order of Batch.rows at the start of the step
    width: int  # positions per row in the verification forward (1 + longest draft)
    draft_s: float
    verify_s: float


class Batch:
    """Rows decoded together on one cache of `max_rows` rows.

    max_len: the longest row (prompt + generated); max_draft: the longest draft any
    row may propose (the cache keeps room for padding past a row's max_len)."""

    def __init__(self, model: CausalLM, max_rows: int, max_len: int, max_draft: int = 0):
        self.model, self.max_rows = model, max_rows
        pad = max_draft + 1 if max_rows > 1 else 0  # a padded row may run past its own limit
        self.cache = model.new_cache(max_rows, max_len + pad, max_chunk=max(PREFILL_CHUNK, max_draft + 1))
        self.rows: list[Row] = []  # rows[i] lives in cache row i

    # -- rows in and out -----------------------------------------------------------------
    def admit(self, row: Row) -> Emitted:
        """Prefill `row` alone on the next free cache row and commit its first token."""
        if len(self.rows) >= self.max_rows:
            raise RuntimeError(f"batch full ({self.max_rows} rows)")
        if len(row.prompt) >= self.cache.max_len:
            raise ValueError(f"prompt of {len(row.prompt)} tokens does not fit the cache of {self.cache.max_len}")
        slot = len(self.rows)
        self.cache.reset(slot)
        try:
            t0 = time.perf_counter()
            out = self._prefill(row, self.cache.rows(slot, slot + 1))
            logits = out.logits[0, -1:]
            _, nxt = verify(torch.empty(0, dtype=torch.long), None, adjust_logits(logits, [], [], row.sp), row.sp,
                            row.gen)
            lps = logprobs_of(logits, [nxt], row.logprobs) if row.logprobs is not None else None
            row.hidden = out.hidden[0, -1].clone()
            if row.record:
                row.argmax.append(-1 if row.sp.greedy else int(logits.argmax()))
            row.stats.prefill_s += time.perf_counter() - t0
            kept, lps = row._commit([nxt], lps)
        except BaseException:
            self.cache.reset(slot)  # the row never joins: its cache row is free again
            raise
        self.rows.append(row)
        return Emitted(row, kept, lps)

    def release(self, row: Row) -> None:
        """Take `row` out; the last row moves into its cache row."""
        i, last = self.rows.index(row), len(self.rows) - 1
        if i != last:
            self.cache.move_row(last, i)
            self.rows[i] = self.rows[last]
        self.rows.pop()
        self.cache.reset(last)

    def _prefill(self, row: Row, view):
        """The prompt in chunks of cache.max_chunk; with prompt logprobs the head reads every position."""
        tokens = torch.tensor([row.tokens])
        if not row.prompt_logprobs and not row.record:
            return self.model.prefill(tokens, view)
        for s in range(0, tokens.shape[1], view.max_chunk):  # the chunks and calls of model.prefill
            chunk = tokens[:, s:s + view.max_chunk]
            out = self.model(chunk, view, logits="last")
            if row.record:
                row.states.append(out.hidden[0].clone())
            if not row.prompt_logprobs:
                continue
            n = min(chunk.shape[1], tokens.shape[1] - s - 1)  # position j scores token j + 1
            for a in range(0, n, HEAD_SLICE):
                b = min(n, a + HEAD_SLICE)
                with torch.inference_mode():
                    logits = self.model.logits(out.hidden[0, a:b])
                row.prompt_token_logprobs += logprobs_of(logits, row.tokens[s + a + 1:s + b + 1], row.logprobs or 0)
        return out

    # -- the step ------------------------------------------------------------------------
    def step(self, cap: int | None = None) -> StepOut:
        """One draft -> verify -> commit cycle for every row; `cap` bounds every draft."""
        rows = list(self.rows)
        B = len(rows)
        errors: dict[int, Exception] = {}
        t0 = time.perf_counter()
        drafts, asked = [], []  # asked: the draft length each row was allowed
        for i, r in enumerate(rows):
            k, d = 0, Draft([])
            try:
                k = self._room(r, i, cap)
                d = self._draft(r, i, k)
            except Exception as e:  # noqa: BLE001 - fails this row only
                errors[i] = e
            asked.append(k)
            drafts.append(d)
        t1 = time.perf_counter()
        N = 1 + max(len(d.tokens) for d in drafts)
        inp = torch.zeros(B, N, dtype=torch.long)  # positions past a row's draft are padding, rolled back
        for i, (r, d) in enumerate(zip(rows, drafts)):
            inp[i, :1 + len(d.tokens)] = torch.tensor([r.tokens[-1]] + d.tokens)
        base = self.cache.lengths
        outs = self._forward(inp, base)
        t2 = time.perf_counter()
        results = []
        for i, (r, d, o) in enumerate(zip(rows, drafts, outs)):
            e = errors.get(i, o if isinstance(o, Exception) else None)
            if e is None:
                try:
                    results.append(self._verify_commit(r, i, d, asked[i], o, base[i], t1 - t0, t2 - t1))
                    continue
                except Exception as err:  # noqa: BLE001
                    e = err
            results.append(Emitted(r, [], error=e))
        return StepOut(results, N, t1 - t0, t2 - t1)

    def _room(self, r: Row, i: int, cap: int | None) -> int:
        """How many tokens row i may draft: its draft length, never past its token budget
        or its context, nor the batch's cap."""
        if r.drafter is None:
            return 0
        room = min(r.stopper.sp.max_new_tokens - len(r.stopper.ids) - 1, r.max_len - self.cache.lengths[i] - 1)
        return max(0, min(r.k, room) if cap is None else min(r.k, room, cap))

    def _draft(self, r: Row, i: int, k: int) -> Draft:
        if k <= 0:
            return Draft([])
        ctx = DraftContext(r.tokens, r.hidden, self.model, self.cache.rows(i, i + 1), 0, r.sp, r.gen)
        return r.drafter.propose(ctx, k).first(k)

    def _forward(self, inp: torch.Tensor, base: tuple[int, ...]) -> list:
        """One target forward over every row: per row (logits [N, V], hidden [N, D]).
        If a batch of several rows fails, each row is retried alone from its length
        before the attempt (the kernels are row-invariant): a row that fails again gets
        its exception instead."""
        B = inp.shape[0]
        try:
            out = self.model(inp, self.cache.rows(0, B), logits="all")
            return [(out.logits[i], out.hidden[i]) for i in range(B)]
        except Exception as e:  # noqa: BLE001 - find the row that caused it
            if B == 1:
                return [e]
            log.warning("batched forward failed; retrying row by row", exc_info=True)
        outs = []
        for i in range(B):
            try:
                self.cache.truncate(i, base[i])  # the failed attempt may have advanced it
                out = self.model(inp[i:i + 1], self.cache.rows(i, i + 1), logits="all")
                outs.append((out.logits[0], out.hidden[0]))
            except Exception as e:  # noqa: BLE001
                outs.append(e)
        return outs

    def _verify_commit(self, r: Row, i: int, d: Draft, asked: int, out, base: int, draft_s: float,
                       verify_s: float) -> Emitted:
        """Accept a prefix of row i's draft, roll its cache row back past it, commit."""
        t0 = time.perf_counter()
        logits, hidden = out
        n = len(d.tokens)
        logits = logits[:n + 1]
        target = adjust_logits(logits, r.stopper.ids, d.tokens, r.sp)
        n_acc, nxt = verify(torch.tensor(d.tokens, dtype=torch.long), d.probs, target, r.sp, r.gen,
                            support=d.support)
        self.cache.truncate(i, base + 1 + n_acc)
        r.hidden = hidden[n_acc].clone()
        if r.record:
            r.states.append(hidden[:n_acc + 1].clone())
            r.argmax += [-1] * (n_acc + 1) if r.sp.greedy else logits[:n_acc + 1].argmax(-1).tolist()
        emitted = d.tokens[:n_acc] + [nxt]
        lps = logprobs_of(logits[:n_acc + 1], emitted, r.logprobs) if r.logprobs is not None else None
        s = r.stats
        s.draft_s += draft_s
        s.verify_s += verify_s
        s.decode_s += draft_s + verify_s
        s.cycles += 1
        s.record(n, n_acc)
        if r.drafter is not None:
            r.drafter.observe(n_acc, n)
            if r.adaptive and asked > 0:  # grow after a fully accepted (or empty) draft, else shrink to it
                r.k = min(r.draft_len, r.k + 1) if n_acc == n else max(1, n_acc + 1)
        kept, lps = r._commit(emitted, lps)
        s.decode_tokens += len(kept)
        # the acceptance test, the target's own token (a sample at temperature > 0) and the
        # commit belong to the cycle's time as much as its forward does
        spent = time.perf_counter() - t0
        s.verify_s += spent
        s.decode_s += spent
        return Emitted(r, kept, lps, n, n_acc)


def logprobs_of(logits: torch.Tensor, tokens: list[int], top_n: int) -> list[Logprob]:
    """logits [n, V] (row j chose tokens[j]) -> per token: its log-softmax and the top_n best."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)].tolist()
    if top_n:
        vals, ids = lp.topk(min(top_n, lp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    else:
        tops = [[] for _ in tokens]
    return [(t, c, top) for t, c, top in zip(tokens, chosen, tops)]
