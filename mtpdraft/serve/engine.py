"""Continuous-batching speculative decoding: one worker thread owns the model.

Design
------
* One shared batch KV cache with ``max_batch`` rows. Active requests always occupy
  rows ``0..n-1`` (compacted): a cycle runs the model on a *view* of the first n
  rows (``tensor[:n]`` is a contiguous view, so writes land in the shared buffers).
  When a row leaves, the last active row's K/V is copied into its slot.
* A new request is prefilled alone, on the B=1 view of its free slot, in the same
  chunks as :func:`mtpdraft.decoding.engine.generate`, so its first token and
  cache are exactly those of single-request decoding.
* Each cycle: every row drafts (its own drafter object, on a B=1 view of its row
  so MTPDraftSource works unchanged), drafts are padded to the batch's longest
  draft, ONE target forward verifies every row, each row keeps its own accepted
  prefix and its cache row is truncated back (padding positions are rolled back
  like rejected drafts: attention is causal and the kernels are row-invariant).
* Batch policy: B * (k+1) <= ``INVARIANT_MAX_ROWS`` (the batch-invariant kernel
  limit, 64) keeps the forward on the row-invariant kernels so batched greedy
  output equals single-request output bit for bit; drafting is off entirely when
  the batch has ``spec_off_batch`` rows or more.
* Requests talk to the worker through a bounded pending queue (``submit``) and a
  per-request ``emit`` callback; a cancelled request frees its row at the next
  cycle boundary.
* Failures are per row: a row whose draft, verification or commit raises is failed
  alone; if the batched forward raises, each row is retried alone and only the rows
  that fail again are failed.
* Logprobs are the target's log-softmax of its raw logits (before temperature,
  top-k/top-p and penalties) at each emitted token, read from the verify forward.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import (SERVE_DRAFT_LEN, SERVE_MAX_BATCH, SERVE_MAX_CONTEXT, SERVE_MAX_QUEUE, SERVE_SHUTDOWN_TIMEOUT_S,
                      SamplingParams, SpecParams, Stats)
from ..decoding.engine import eos_ids_of
from ..decoding.penalties import adjust_logits
from ..decoding.stops import StopChecker
from ..decoding.verify import verify
from ..drafters import make_drafter
from ..drafters.base import Draft, DraftContext
from ..layers import INVARIANT_MAX_ROWS
from .metrics import Metrics

log = logging.getLogger("mtpdraft.serve")

MAX_DRAFT = 32  # SpecParams' upper bound: the padding slack the cache keeps past max_context
PREFILL_CHUNK = 256  # = generate()'s max_chunk: same chunking, same numerics
HEAD_SLICE = 32  # prompt logprobs: positions per head matmul (bounds the [n, V] logits)


class QueueFull(Exception):
    pass


class EngineStopped(Exception):
    pass


# One logprob entry per token: (token id, logprob, [(id, logprob) of the top_n best]).
Logprob = tuple[int, float, list[tuple[int, float]]]


@dataclass(eq=False)
class GenRequest:
    """One sequence to decode. `emit` is called from the worker with ("done", info) or
    ("error", message); a streaming request also gets ("tokens", ids, text, logprobs)
    after each step, where text is the newly final part of the output text, and
    ("prompt", logprobs) after its prefill when it asked for prompt logprobs."""

    prompt_ids: list[int]
    sp: SamplingParams
    emit: Callable[[tuple], None]
    speculative: bool = True
    draft_len: int | None = None
    id: str = ""
    stream: bool = False
    logprobs: int | None = None  # None = off, else how many alternatives per token
    prompt_logprobs: bool = False  # also the prompt's tokens (echo); needs logprobs
    # worker state
    cancelled: bool = False
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    hidden: torch.Tensor | None = None
    stats: Stats = field(default_factory=Stats)
    stopper: StopChecker | None = None
    drafter: object = None
    gen: torch.Generator | None = None
    k: int = 0
    t_submit: float = 0.0
    t_first: float = 0.0
    sent: int = 0  # characters of text streamed so far
    token_logprobs: list[Logprob] = field(default_factory=list)
    prompt_token_logprobs: list[Logprob] = field(default_factory=list)  # from the 2nd prompt token

    def cancel(self) -> None:
        self.cancelled = True


class BatchEngine:
    def __init__(self, model, tokenizer, *, drafter: str = "none", max_batch: int = SERVE_MAX_BATCH,
                 max_context: int = SERVE_MAX_CONTEXT, draft_len: int = SERVE_DRAFT_LEN, adaptive: bool = False,
                 max_queue: int = SERVE_MAX_QUEUE, spec_off_batch: int = 0,
                 metrics: Metrics | None = None):
        if not 1 <= max_batch <= INVARIANT_MAX_ROWS:
            raise ValueError(f"max_batch must be in 1..{INVARIANT_MAX_ROWS} (the batch-invariant kernel limit)")
        limit = model.args.max_position_embeddings - MAX_DRAFT - 1
        if not 2 <= max_context <= limit:
            raise ValueError(f"max_context must be in 2..{limit} for this model")
        SpecParams(draft_len=draft_len)  # validates
        self.model, self.tok = model, tokenizer
        self.drafter_spec = drafter
        make_drafter(drafter, model, model.name)  # fail at startup, not per request
        self.max_batch, self.max_context = max_batch, max_context
        self.draft_len, self.adaptive = draft_len, adaptive
        self.max_queue = max_queue
        self.spec_off_batch = spec_off_batch  # 0 = never switch drafting off
        self.metrics = metrics or Metrics()
        self.eos = eos_ids_of(model, tokenizer)
        self.cache = model.new_cache(max_batch, max_context + MAX_DRAFT + 1, max_chunk=PREFILL_CHUNK)
        self.active: list[GenRequest] = []  # row i of the cache belongs to active[i]
        self.pending: collections.deque[GenRequest] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mtpdraft-engine", daemon=True)
        self.alive = False

    # -- client side (any thread) ------------------------------------------------------
    def start(self) -> "BatchEngine":
        self.alive = True
        self._thread.start()
        return self

    def submit(self, *reqs: GenRequest) -> None:
        """Queue requests, all or none."""
        with self._cv:
            if self._stopping:
                raise EngineStopped("server is shutting down")
            if len(self.pending) + len(reqs) > self.max_queue:
                raise QueueFull(f"too many queued requests ({self.max_queue}); retry later")
            for r in reqs:
                r.t_submit = time.perf_counter()
                self.pending.append(r)
            self._cv.notify()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def stop(self, timeout: float = SERVE_SHUTDOWN_TIMEOUT_S) -> None:
        """Stop admitting; let in-flight requests finish for up to `timeout`, then cancel the rest."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline and (self.active or self.pending):
            time.sleep(0.02)
        with self._cv:
            for r in list(self.pending) + list(self.active):
                r.cancel()
            self._cv.notify()
        self._thread.join(timeout=5.0)

    @property
    def num_active(self) -> int:
        return len(self.active)

    @property
    def num_pending(self) -> int:
        return len(self.pending)

    # -- cache views -----------------------------------------------------------------------
    def _move_row(self, src: int, dst: int) -> None:
        for l in self.cache.layers:
            l.k[dst].copy_(l.k[src])
            l.v[dst].copy_(l.v[src])
        self.cache.lengths[dst] = self.cache.lengths[src]

    def _release(self, req: GenRequest) -> None:
        i = self.active.index(req)
        last = len(self.active) - 1
        if i != last:
            moved = self.active[last]
            self._move_row(last, i)
            self.active[i] = moved
            moved.slot = i
        self.active.pop()
        self.cache.lengths[last] = 0
        req.slot = -1

    # -- worker ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self.pending and not self.active and not self._stopping:
                        self._cv.wait(timeout=1.0)
                    if self._stopping and not self.active and not self.pending:
                        return
                    admit = []
                    while self.pending and len(self.active) + len(admit) < self.max_batch:
                        r = self.pending.popleft()
                        if r.cancelled:
                            self._finish(r, "cancelled")
                        else:
                            admit.append(r)
                    if self._stopping:  # no new rows once stopping started
                        for r in admit:
                            self._finish(r, "cancelled")
                        admit = []
                for r in admit:
                    self._guard(self._admit, r)
                for r in [r for r in self.active if r.cancelled]:
                    self._release(r)
                    self._finish(r, "cancelled")
                if self.active:
                    try:
                        self._cycle()
                    except Exception as e:  # noqa: BLE001 - never let the worker die
                        log.error("batch cycle failed:\n%s", traceback.format_exc())
                        for r in list(self.active):
                            self._drop(r, e)
        finally:
            self.alive = False
            with self._cv:
                leftover = list(self.pending) + list(self.active)
                self.pending.clear()
            for r in leftover:
                self._finish(r, "cancelled")

    def _guard(self, fn, r: GenRequest, *args):
        """Run fn(r, *args); if it raises, fail r alone (None is returned)."""
        try:
            return fn(r, *args)
        except Exception as e:  # noqa: BLE001
            log.error("request %s failed:\n%s", r.id, traceback.format_exc())
            self._drop(r, e)
            return None

    def _drop(self, r: GenRequest, e: Exception) -> None:
        if r in self.active:
            self._release(r)
        self._fail(r, f"internal error during decoding: {type(e).__name__}: {e}")

    def _fail(self, r: GenRequest, msg: str) -> None:
        self.metrics.request_done(r, "error")
        _safe_emit(r, ("error", msg))

    def _finish(self, r: GenRequest, reason: str) -> None:
        status = "cancelled" if reason == "cancelled" else "ok"
        self.metrics.request_done(r, status)
        text = r.stopper.text() if r.stopper and reason != "cancelled" else None
        info = {"finish_reason": reason, "token_ids": list(r.stopper.ids) if r.stopper else [], "stats": r.stats,
                "text": text, "logprobs": r.token_logprobs if r.logprobs is not None else None,
                "prompt_logprobs": r.prompt_token_logprobs if r.prompt_logprobs else None}
        _safe_emit(r, ("done", info))

    def _admit(self, r: GenRequest) -> None:
        """Prefill r alone on the B=1 view of the next free row; emit its first token."""
        if len(r.prompt_ids) >= self.max_context:
            raise ValueError("prompt does not fit the context")
        r.stopper = StopChecker(r.sp, self.eos, self.tok)
        r.gen = torch.Generator().manual_seed(r.sp.seed) if r.sp.seed is not None else None
        k_max = r.draft_len or self.draft_len
        if r.speculative:
            r.drafter = make_drafter(self.drafter_spec, self.model, self.model.name)
        r.k = k_max if r.drafter is not None else 0
        r.tokens = list(r.prompt_ids)
        r.stats.prompt_tokens = len(r.tokens)
        slot = len(self.active)
        self.cache.lengths[slot] = 0
        view = self.cache.rows(slot, slot + 1)
        t0 = time.perf_counter()
        out = self._prefill(r, view)
        self.cache.lengths[slot] = view.lengths[0]
        logits = out.logits[0, -1:]
        _, nxt = verify(torch.empty(0, dtype=torch.long), None, adjust_logits(logits, [], [], r.sp), r.sp, r.gen)
        lps = logprobs_of(logits, [nxt], r.logprobs) if r.logprobs is not None else None
        r.hidden = out.hidden[0, -1].clone()
        r.stats.prefill_s += time.perf_counter() - t0
        r.t_first = time.perf_counter()
        self.metrics.observe_ttft(r.t_first - r.t_submit)
        self.metrics.prefill_done(len(r.tokens))
        r.slot = slot
        self.active.append(r)
        if r.stream and r.prompt_logprobs:
            _safe_emit(r, ("prompt", r.prompt_token_logprobs))
        self._emit_tokens(r, [nxt], lps)

    def _prefill(self, r: GenRequest, view):
        """model.prefill's chunks; with prompt logprobs, the head also reads every position."""
        tokens = torch.tensor([r.tokens])
        if not r.prompt_logprobs:
            return self.model.prefill(tokens, view)
        for s in range(0, tokens.shape[1], view.max_chunk):
            chunk = tokens[:, s:s + view.max_chunk]
            out = self.model(chunk, view, logits="last")
            # position j predicts token j + 1: score the chunk's successors inside the prompt
            n = min(chunk.shape[1], tokens.shape[1] - s - 1)
            for a in range(0, n, HEAD_SLICE):
                b = min(n, a + HEAD_SLICE)
                with torch.inference_mode():
                    logits = self.model.logits(out.hidden[0, a:b])
                r.prompt_token_logprobs += logprobs_of(logits, r.tokens[s + a + 1:s + b + 1], r.logprobs or 0)
        return out

    def _emit_tokens(self, r: GenRequest, toks: list[int], logprobs: list[Logprob] | None = None) -> bool:
        """Commit tokens through the stop checker; emit them; release + finish if done."""
        out = []
        done = False
        for t in toks:
            r.tokens.append(t)
            r.stats.tokens += 1
            out.append(t)
            if r.stopper.add(t):
                done = True
                break
        self.metrics.tokens_generated(len(out))
        lps = None
        if logprobs is not None:
            lps = logprobs[:len(out)]
            r.token_logprobs += lps
        if r.stream:
            text = r.stopper.stable_text()
            delta, r.sent = text[r.sent:], max(r.sent, len(text))
            _safe_emit(r, ("tokens", out, delta, lps))
        if done:
            self._release(r)
            self._finish(r, r.stopper.reason)
        return done

    def draft_cap(self, batch: int) -> int:
        """The policy: how many draft tokens a row may propose in a batch of `batch` rows."""
        if self.spec_off_batch and batch >= self.spec_off_batch:
            return 0
        return max(0, INVARIANT_MAX_ROWS // batch - 1)

    def _cycle(self) -> None:
        rows = list(self.active)
        B = len(rows)
        cap = self.draft_cap(B)
        failed: dict[GenRequest, Exception] = {}  # dropped only once row indices no longer matter

        def attempt(fn, r, *args):
            try:
                return fn(r, *args)
            except Exception as e:  # noqa: BLE001
                log.error("request %s failed:\n%s", r.id, traceback.format_exc())
                failed[r] = e
                return None

        t0 = time.perf_counter()
        drafts = [attempt(self._draft, r, i, cap) for i, r in enumerate(rows)]
        t1 = time.perf_counter()
        N = 1 + max((len(d.tokens) for d in drafts if d is not None), default=0)
        inp = torch.zeros(B, N, dtype=torch.long)
        for i, (r, d) in enumerate(zip(rows, drafts)):
            row = [r.tokens[-1]] + (d.tokens if d is not None else [])
            inp[i, :len(row)] = torch.tensor(row)  # the rest is padding (token 0), rolled back below
        base = self.cache.lengths[:B]
        outs = self._forward(inp)
        t2 = time.perf_counter()
        self.metrics.observe_forward(B, N, t2 - t1)
        verified = []
        for i, (r, d, o) in enumerate(zip(rows, drafts, outs)):
            if isinstance(o, Exception):
                failed.setdefault(r, o)
            elif r not in failed:
                res = attempt(self._verify, r, d, o, i, base[i])
                if res is not None:
                    verified.append((r, d, *res))
        now = time.perf_counter()
        for r, e in failed.items():
            self._drop(r, e)
        for r, d, n_acc, nxt, lps in verified:
            self._guard(self._commit, r, d, n_acc, nxt, lps, (t1 - t0, now - t1))

    def _draft(self, r: GenRequest, i: int, cap: int) -> Draft:
        """Row i's draft: never past its token budget or the context."""
        room = min(r.sp.max_new_tokens - len(r.stopper.ids) - 1, self.max_context - self.cache.lengths[i] - 1)
        k = min(r.k, room, cap)
        if r.drafter is None or k <= 0:
            return Draft([])
        ctx = DraftContext(r.tokens, r.hidden, self.model, self.cache.rows(i, i + 1), 0, r.sp, r.gen)
        d = r.drafter.propose(ctx, k)
        return Draft(list(d.tokens[:k]), None if d.probs is None else d.probs[:k])

    def _forward(self, inp: torch.Tensor) -> list:
        """One target forward over every row; per row (logits [N, V], hidden [N, D]).
        If the batch fails, each row is retried alone (the kernels are row-invariant):
        a row that fails again gets its exception instead."""
        B = inp.shape[0]
        view = self.cache.rows(0, B)
        try:
            out = self.model(inp, view, logits="all")
            return [(out.logits[i], out.hidden[i]) for i in range(B)]
        except Exception:  # noqa: BLE001 - find the row that caused it
            log.error("batched forward failed; retrying row by row:\n%s", traceback.format_exc())
        outs = []
        for i in range(B):
            try:
                out = self.model(inp[i:i + 1], self.cache.rows(i, i + 1), logits="all")
                outs.append((out.logits[0], out.hidden[0]))
            except Exception as e:  # noqa: BLE001
                outs.append(e)
        return outs

    def _verify(self, r: GenRequest, d: Draft, out, i: int, base: int):
        """Accept a prefix of row i's draft; roll its cache row back past it."""
        logits, hidden = out
        n = len(d.tokens)
        logits = logits[:n + 1]
        target = adjust_logits(logits, r.stopper.ids, d.tokens, r.sp)
        n_acc, nxt = verify(torch.tensor(d.tokens, dtype=torch.long), d.probs, target, r.sp, r.gen)
        self.cache.lengths[i] = base + 1 + n_acc  # roll back rejected drafts and padding
        r.hidden = hidden[n_acc].clone()
        emitted = d.tokens[:n_acc] + [nxt]
        lps = logprobs_of(logits[:n_acc + 1], emitted, r.logprobs) if r.logprobs is not None else None
        return n_acc, nxt, lps

    def _commit(self, r: GenRequest, d: Draft, n_acc: int, nxt: int, lps, times: tuple[float, float]) -> None:
        n = len(d.tokens)
        s = r.stats
        s.draft_s += times[0]
        s.verify_s += times[1]
        s.decode_s += times[0] + times[1]
        s.cycles += 1
        s.record(n, n_acc)
        self.metrics.cycle(n, n_acc)
        emitted = d.tokens[:n_acc] + [nxt]
        if r.drafter is not None:
            r.drafter.observe(n_acc, n)
            if self.adaptive and n > 0:
                k_max = r.draft_len or self.draft_len
                r.k = min(k_max, r.k + 1) if n_acc == n else max(1, n_acc + 1)
        before = s.tokens
        self._emit_tokens(r, emitted, lps)
        s.decode_tokens += s.tokens - before  # like generate(): tokens past a stop are not counted


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


def _safe_emit(r: GenRequest, ev: tuple) -> None:
    try:
        r.emit(ev)
    except Exception:  # noqa: BLE001 - a closed event loop must not kill the worker
        pass
