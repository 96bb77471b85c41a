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

from ..config import SamplingParams, SpecParams, Stats
from ..decoding.engine import eos_ids_of
from ..decoding.stops import StopChecker
from ..decoding.verify import verify
from ..drafters import make_drafter
from ..drafters.base import Draft, DraftContext
from ..layers import INVARIANT_MAX_ROWS
from .metrics import Metrics

log = logging.getLogger("mtpdraft.serve")

MAX_DRAFT = 32  # SpecParams' upper bound: the padding slack the cache keeps past max_context
PREFILL_CHUNK = 256  # = generate()'s max_chunk: same chunking, same numerics


class QueueFull(Exception):
    pass


class EngineStopped(Exception):
    pass


@dataclass(eq=False)
class GenRequest:
    prompt_ids: list[int]
    sp: SamplingParams
    emit: Callable[[tuple], None]  # called from the worker: ("tokens", [ids]) / ("done", info) / ("error", msg)
    speculative: bool = True
    draft_len: int | None = None
    id: str = ""
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

    def cancel(self) -> None:
        self.cancelled = True


class BatchEngine:
    def __init__(self, model, tokenizer, *, drafter: str = "none", max_batch: int = 8, max_context: int = 2048,
                 draft_len: int = 4, adaptive: bool = False, max_queue: int = 64, spec_off_batch: int = 0,
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

    def submit(self, req: GenRequest) -> None:
        with self._cv:
            if self._stopping:
                raise EngineStopped("server is shutting down")
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"too many queued requests ({self.max_queue}); retry later")
            req.t_submit = time.perf_counter()
            self.pending.append(req)
            self._cv.notify()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def stop(self, timeout: float = 10.0) -> None:
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
                            self._release(r)
                            self._fail(r, f"internal error during decoding: {e}")
        finally:
            self.alive = False
            with self._cv:
                leftover = list(self.pending) + list(self.active)
                self.pending.clear()
            for r in leftover:
                self._finish(r, "cancelled")

    def _guard(self, fn, r: GenRequest) -> None:
        try:
            fn(r)
        except Exception as e:  # noqa: BLE001
            log.error("request %s failed:\n%s", r.id, traceback.format_exc())
            if r in self.active:
                self._release(r)
            self._fail(r, f"internal error: {e}")

    def _fail(self, r: GenRequest, msg: str) -> None:
        self.metrics.request_done(r, "error")
        _safe_emit(r, ("error", msg))

    def _finish(self, r: GenRequest, reason: str) -> None:
        status = "cancelled" if reason == "cancelled" else "ok"
        self.metrics.request_done(r, status)
        info = {"finish_reason": reason, "token_ids": list(r.stopper.ids) if r.stopper else [],
                "stats": r.stats, "text": r.stopper.text() if r.stopper and reason != "cancelled" else None}
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
        out = self.model.prefill(torch.tensor([r.tokens]), view)
        self.cache.lengths[slot] = view.lengths[0]
        _, nxt = verify(torch.empty(0, dtype=torch.long), None, out.logits[0, -1:], r.sp, r.gen)
        r.hidden = out.hidden[0, -1].clone()
        r.stats.prefill_s += time.perf_counter() - t0
        r.t_first = time.perf_counter()
        self.metrics.observe_ttft(r.t_first - r.t_submit)
        self.metrics.prefill_done(len(r.tokens))
        r.slot = slot
        self.active.append(r)
        self._emit_tokens(r, [nxt])

    def _emit_tokens(self, r: GenRequest, toks: list[int]) -> bool:
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
        _safe_emit(r, ("tokens", out))
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
        t0 = time.perf_counter()
        drafts: list[Draft] = []
        for i, r in enumerate(rows):
            room = min(r.sp.max_new_tokens - len(r.stopper.ids) - 1, self.max_context - self.cache.lengths[i] - 1)
            k = min(r.k, room, cap)
            d = Draft([])
            if r.drafter is not None and k > 0:
                ctx = DraftContext(r.tokens, r.hidden, self.model, self.cache.rows(i, i + 1), 0)
                d = r.drafter.propose(ctx, k)
                d = Draft(list(d.tokens[:k]), None if d.probs is None else d.probs[:k])
            drafts.append(d)
        t1 = time.perf_counter()
        N = 1 + max(len(d.tokens) for d in drafts)
        inp = torch.zeros(B, N, dtype=torch.long)
        for i, (r, d) in enumerate(zip(rows, drafts)):
            row = [r.tokens[-1]] + d.tokens
            inp[i, :len(row)] = torch.tensor(row)  # the rest is padding (token 0), rolled back below
        view = self.cache.rows(0, B)
        base = list(view.lengths)
        out = self.model(inp, view, logits="all")
        t2 = time.perf_counter()
        self.metrics.observe_forward(B, N, t2 - t1)
        results = []
        for i, (r, d) in enumerate(zip(rows, drafts)):
            n = len(d.tokens)
            n_acc, nxt = verify(torch.tensor(d.tokens, dtype=torch.long), d.probs, out.logits[i, :n + 1], r.sp, r.gen)
            self.cache.lengths[i] = base[i] + 1 + n_acc  # roll back rejected drafts and padding
            r.hidden = out.hidden[i, n_acc].clone()
            results.append((r, d, n_acc, nxt))
        now = time.perf_counter()
        for r, d, n_acc, nxt in results:
            n = len(d.tokens)
            s = r.stats
            s.draft_s += t1 - t0
            s.verify_s += now - t1
            s.decode_s += now - t0
            s.cycles += 1
            s.record(n, n_acc)
            self.metrics.cycle(n, n_acc)
            emitted = d.tokens[:n_acc] + [nxt]
            s.decode_tokens += len(emitted)  # counted like generate(): tokens past a stop are dropped below
            if r.drafter is not None:
                r.drafter.observe(n_acc, n)
                if self.adaptive and n > 0:
                    k_max = r.draft_len or self.draft_len
                    r.k = min(k_max, r.k + 1) if n_acc == n else max(1, n_acc + 1)
            before = s.tokens
            self._emit_tokens(r, emitted)
            s.decode_tokens -= len(emitted) - (s.tokens - before)


def _safe_emit(r: GenRequest, ev: tuple) -> None:
    try:
        r.emit(ev)
    except Exception:  # noqa: BLE001 - a closed event loop must not kill the worker
        pass
