"""Server metrics in the Prometheus text exposition format (no extra dependency)."""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.n += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, acc = [], 0
        sep = "," if labels else ""
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{b}"}} {acc}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        lab = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{lab} {self.sum:.6f}")
        out.append(f"{name}_count{lab} {self.n}")
        return out


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {"ok": 0, "cancelled": 0, "error": 0}
        self.http = {}  # status code -> count
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.finished_tokens = {"ok": 0, "cancelled": 0, "error": 0}
        self.row_cycles = 0
        self.cycle_tokens = 0
        self.proposed = 0
        self.accepted = 0
        self.proposed_by_pos: list[int] = []
        self.accepted_by_pos: list[int] = []
        self.forwards = 0
        self.forward_rows = 0
        self.latency = Histogram()
        self.ttft = Histogram()
        self.forward_time = Histogram((0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
        self.batch_size = Histogram((1, 2, 4, 8, 16, 32, 64))
        self.gauges = lambda: {}

    # -- engine hooks (worker thread) ----------------------------------------------------
    def prefill_done(self, n: int) -> None:
        with self.lock:
            self.prompt_tokens += n

    def tokens_generated(self, n: int) -> None:
        with self.lock:
            self.generated_tokens += n

    def cycle(self, proposed: int, accepted: int) -> None:
        with self.lock:
            self.row_cycles += 1
            self.cycle_tokens += accepted + 1
            self.proposed += proposed
            self.accepted += accepted
            while len(self.proposed_by_pos) < proposed:
                self.proposed_by_pos.append(0)
                self.accepted_by_pos.append(0)
            for i in range(proposed):
                self.proposed_by_pos[i] += 1
                self.accepted_by_pos[i] += i < accepted

    def observe_forward(self, batch: int, n: int, seconds: float) -> None:
        with self.lock:
            self.forwards += 1
            self.forward_rows += batch
            self.forward_time.observe(seconds)
            self.batch_size.observe(batch)

    def observe_ttft(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def request_done(self, req, status: str) -> None:
        import time

        with self.lock:
            self.requests[status] += 1
            self.finished_tokens[status] += len(req.stopper.ids) if req.stopper else 0
            if status == "ok" and req.t_submit:
                self.latency.observe(time.perf_counter() - req.t_submit)

    def http_response(self, code: int) -> None:
        with self.lock:
            self.http[code] = self.http.get(code, 0) + 1

    # -- exposition ------------------------------------------------------------------------
    def render(self) -> str:
        L: list[str] = []

        def metric(name, kind, help_, samples):
            L.append(f"# HELP {name} {help_}")
            L.append(f"# TYPE {name} {kind}")
            for labels, v in samples:
                L.append(f"{name}{{{labels}}} {v}" if labels else f"{name} {v}")

        with self.lock:
            metric("mtpdraft_requests_total", "counter", "Generation requests finished, by status.",
                   [(f'status="{k}"', v) for k, v in self.requests.items()])
            metric("mtpdraft_http_responses_total", "counter", "HTTP responses by status code.",
                   [(f'code="{k}"', v) for k, v in sorted(self.http.items())])
            metric("mtpdraft_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", self.prompt_tokens)])
            metric("mtpdraft_generation_tokens_total", "counter", "Tokens generated and sent to clients.",
                   [("", self.generated_tokens)])
            metric("mtpdraft_finished_generation_tokens_total", "counter",
                   "Tokens of finished requests (usage.completion_tokens), by request status.",
                   [(f'status="{k}"', v) for k, v in self.finished_tokens.items()])
            metric("mtpdraft_verify_cycles_total", "counter", "Draft/verify cycles (one per row per batch forward).",
                   [("", self.row_cycles)])
            metric("mtpdraft_draft_tokens_proposed_total", "counter", "Draft tokens proposed.", [("", self.proposed)])
            metric("mtpdraft_draft_tokens_accepted_total", "counter", "Draft tokens accepted.", [("", self.accepted)])
            mean = self.cycle_tokens / self.row_cycles if self.row_cycles else 0.0
            metric("mtpdraft_mean_acceptance_length", "gauge",
                   "Mean tokens emitted per verify cycle (accepted drafts + the target's token).",
                   [("", f"{mean:.6f}")])
            metric("mtpdraft_acceptance_rate_by_position", "gauge",
                   "Fraction of proposed draft tokens accepted, by draft position (1-based).",
                   [(f'position="{i + 1}"', f"{a / p:.6f}")
                    for i, (a, p) in enumerate(zip(self.accepted_by_pos, self.proposed_by_pos)) if p])
            metric("mtpdraft_draft_proposed_by_position_total", "counter", "Draft tokens proposed, by position.",
                   [(f'position="{i + 1}"', p) for i, p in enumerate(self.proposed_by_pos)])
            metric("mtpdraft_batch_forwards_total", "counter", "Batched target forwards.", [("", self.forwards)])
            for name, h, help_ in [
                ("mtpdraft_request_latency_seconds", self.latency, "Request latency from queueing to the last token."),
                ("mtpdraft_time_to_first_token_seconds", self.ttft, "Time from queueing to the first token."),
                ("mtpdraft_batch_forward_seconds", self.forward_time, "Wall time of one batched verify forward."),
                ("mtpdraft_batch_size", self.batch_size, "Rows per batched verify forward."),
            ]:
                L.append(f"# HELP {name} {help_}")
                L.append(f"# TYPE {name} histogram")
                L.extend(h.lines(name))
        for name, (help_, v) in self.gauges().items():
            metric(name, "gauge", help_, [("", v)])
        return "\n".join(L) + "\n"


def parse_prometheus(text: str) -> dict[str, float]:
    """`name{labels}` -> value, for tests and the benchmark."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out
