"""Continuous-batching speculative decoding: one worker thread owns the model.

Design
------
* Decoding is the shared step (`mtpdraft.decoding.step.Batch`): one batch cache with
  ``max_batch`` rows, active requests compacted into rows ``0..n-1``, each new request
  prefilled alone on its own row (so its first token and cache are exactly those of
  single-request decoding), then cycles in which every row drafts, ONE target forward
  verifies every row, and each row commits its own accepted prefix.
* Batch policy: B * (k+1) <= ``INVARIANT_MAX_ROWS`` (the batch-invariant kernel
  limit, 64) keeps the forward on the row-invariant kernels so batched greedy
  output equals single-request output bit for bit; drafting is off entirely when
  the batch has ``spec_off_batch`` rows or more.
* Requests talk to the worker through a bounded pending queue (``submit``) and a
  per-request ``emit`` callback; a cancelled request frees its row at the next
  cycle boundary.
* Failures are per row (the step reports each row's exception): a failed row is
  failed alone, its batch-mates go on.
* Logprobs are the target's log-softmax of its raw logits (before temperature,
  top-k/top-p and penalties) at each emitted token, read from the verify forward.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from ..config import (SERVE_DRAFT_LEN, SERVE_MAX_BATCH, SERVE_MAX_CONTEXT, SERVE_MAX_QUEUE, SERVE_SHUTDOWN_TIMEOUT_S,
                      SamplingParams, SpecParams, Stats)
from ..decoding.engine import eos_ids_of
from ..decoding.step import Batch, Logprob, Row
from ..decoding.stops import StopChecker
from ..drafters import drafter_factory
from ..layers import INVARIANT_MAX_ROWS
from .metrics import Metrics

log = logging.getLogger("mtpdraft.serve")

MAX_DRAFT = 32  # SpecParams' upper bound: the padding slack the cache keeps past max_context


class QueueFull(Exception):
    pass


class EngineStopped(Exception):
    pass


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
    row: Row | None = None  # the decoding state, once admitted
    stats: Stats = field(default_factory=Stats)
    stopper: StopChecker | None = None
    t_submit: float = 0.0
    t_first: float = 0.0
    sent: int = 0  # characters of text streamed so far

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
        # resolved and loaded once (a bad spec fails at startup); each request gets a fresh drafter on it
        self.new_drafter = drafter_factory(drafter, model, model.name)
        self.max_batch, self.max_context = max_batch, max_context
        self.draft_len, self.adaptive = draft_len, adaptive
        self.max_queue = max_queue
        self.spec_off_batch = spec_off_batch  # 0 = never switch drafting off
        self.metrics = metrics or Metrics()
        self.eos = eos_ids_of(model, tokenizer)
        self.batch = Batch(model, max_batch, max_context, max_draft=MAX_DRAFT)
        self._req: dict[Row, GenRequest] = {}  # the request of each batch row
        self.pending: collections.deque[GenRequest] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mtpdraft-engine", daemon=True)
        self.alive = False

    @classmethod
    def launch(cls, load: Callable[[], tuple], **kw) -> "BatchEngine":
        """An engine whose thread does all of the model's work, loading included: `load()`
        returns (model, tokenizer), and the engine is built and run on the same thread.

        The native kernels and torch parallelize with OpenMP, and libgomp keeps a pool of
        threads per thread that starts parallel work: a model loaded on one thread and run on
        another leaves two pools on the machine's cores, and libgomp then all but stops
        spinning between parallel regions (it throttles when its threads outnumber the
        CPUs). Measured on 2 cores: a SmolLM2 decode step took 2.75 ms on the thread that
        loaded the model and 8.7 ms on a second thread; 2.45 ms loaded and run on one.
        Errors while loading or building are raised here; an engine whose caller stopped
        waiting (Ctrl-C while loading) never runs."""
        ready: queue.Queue = queue.Queue()
        abandoned = threading.Event()

        def run() -> None:
            try:
                engine = cls(*load(), **kw)
                engine._thread, engine.alive = threading.current_thread(), not abandoned.is_set()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                ready.put(e)
                return
            ready.put(engine)
            if engine.alive:
                engine._run()

        threading.Thread(target=run, name="mtpdraft-engine", daemon=True).start()
        try:
            out = ready.get()
        except BaseException:
            abandoned.set()
            raise
        if isinstance(out, BaseException):
            raise out
        return out

    # -- client side (any thread) ------------------------------------------------------
    def start(self) -> "BatchEngine":
        """Start the worker thread (an engine from launch() runs already)."""
        if self.alive:
            return self
        if self._thread.ident is not None:  # a thread runs once
            raise RuntimeError("this engine has stopped; build a new one (build_app / BatchEngine.launch)")
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
    def active(self) -> list[GenRequest]:
        """Admitted requests, in cache-row order."""
        return [r for row in list(self.batch.rows) if (r := self._req.get(row)) is not None]

    @property
    def num_active(self) -> int:
        return len(self.batch.rows)

    @property
    def num_pending(self) -> int:
        return len(self.pending)

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

    def _release(self, r: GenRequest) -> None:
        self.batch.release(r.row)
        del self._req[r.row]

    def _drop(self, r: GenRequest, e: Exception) -> None:
        if r.row is not None and r.row in self._req:
            self._release(r)
        self._fail(r, f"internal error during decoding: {type(e).__name__}: {e}")

    def _fail(self, r: GenRequest, msg: str) -> None:
        self.metrics.request_done(r, "error")
        _safe_emit(r, ("error", msg))

    def _finish(self, r: GenRequest, reason: str) -> None:
        status = "cancelled" if reason == "cancelled" else "ok"
        self.metrics.request_done(r, status)
        text = r.stopper.text() if r.stopper and reason != "cancelled" else None
        row = r.row
        info = {"finish_reason": reason, "token_ids": list(r.stopper.ids) if r.stopper else [], "stats": r.stats,
                "text": text, "logprobs": row.token_logprobs if row and r.logprobs is not None else None,
                "prompt_logprobs": row.prompt_token_logprobs if row and r.prompt_logprobs else None}
        _safe_emit(r, ("done", info))

    def _admit(self, r: GenRequest) -> None:
        """Prefill r alone on the next free row; emit its first token."""
        r.stopper = StopChecker(r.sp, self.eos, self.tok)
        drafter = self.new_drafter() if r.speculative else None
        row = Row(r.prompt_ids, r.sp, r.stopper, self.max_context, drafter, r.draft_len or self.draft_len,
                  self.adaptive, r.logprobs, r.prompt_logprobs, stats=r.stats)
        first = self.batch.admit(row)
        r.row = row
        self._req[row] = r
        r.t_first = time.perf_counter()
        self.metrics.observe_ttft(r.t_first - r.t_submit)
        self.metrics.prefill_done(len(r.prompt_ids))
        if r.stream and r.prompt_logprobs:
            _safe_emit(r, ("prompt", row.prompt_token_logprobs))
        self._emit_tokens(r, first.tokens, first.logprobs)

    def _emit_tokens(self, r: GenRequest, toks: list[int], lps: list[Logprob] | None) -> None:
        """Emit committed tokens; release + finish the request if its row is done."""
        self.metrics.tokens_generated(len(toks))
        if r.stream:
            text = r.stopper.stable_text()
            delta, r.sent = text[r.sent:], max(r.sent, len(text))
            _safe_emit(r, ("tokens", toks, delta, lps))
        if r.row.done:
            self._release(r)
            self._finish(r, r.stopper.reason)

    def draft_cap(self, batch: int) -> int:
        """The policy: how many draft tokens a row may propose in a batch of `batch` rows."""
        if self.spec_off_batch and batch >= self.spec_off_batch:
            return 0
        return max(0, INVARIANT_MAX_ROWS // batch - 1)

    def _cycle(self) -> None:
        B = len(self.batch.rows)
        out = self.batch.step(self.draft_cap(B))
        self.metrics.observe_forward(B, out.width, out.verify_s)
        for e in out.rows:
            r = self._req[e.row]
            if e.error is not None:
                log.error("request %s failed:\n%s", r.id,
                          "".join(traceback.format_exception(type(e.error), e.error, e.error.__traceback__)))
                self._drop(r, e.error)
                continue
            self.metrics.cycle(e.proposed, e.accepted)
            self._guard(self._emit_tokens, r, e.tokens, e.logprobs)


def _safe_emit(r: GenRequest, ev: tuple) -> None:
    try:
        r.emit(ev)
    except Exception:  # noqa: BLE001 - a closed event loop must not kill the worker
        pass
