"""Settings, validated on construction. Defaults live here and nowhere else."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Temperatures below this decode greedily: dividing logits by ~1e-40 overflows fp32,
# and long before that the distribution is a point mass on the argmax.
GREEDY_BELOW = 1e-5


@dataclass(slots=True)
class SamplingParams:
    """presence_penalty / frequency_penalty (OpenAI's): subtracted from the target's logits
    of each token once if it was generated already / once per time it was; logit_bias:
    token id -> value added to its logit. All three act on the target's logits before
    greedy choice or verification, so speculative decoding stays exact."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # below GREEDY_BELOW = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if any(not -100 <= b <= 100 for b in self.logit_bias.values()):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


# The defaults as values (for command-line flags and function signatures).
DEFAULT_SAMPLING = SamplingParams()


# Weights: the GGUF file's own quantized blocks where the model came from one, else
# bf16 (models.WEIGHT_FORMATS lists the choices).
DEFAULT_WEIGHTS = "auto"
WEIGHT_CHOICES = ("auto", "gguf", "q8_0", "bf16", "fp32")

# Tokens drafted per cycle where neither the request nor the drafter (`auto.json`'s
# `draft_len`, chosen with its variant) sets one. On held-out training prompts (never the bench set) k=6 was
# the fastest of 3..6 and adaptive with the default quantized weights (a 7-token
# verification ~2.5 one-token forwards), and as fast as k=4 or faster with bf16 (~1.5),
# with a higher tau (README, the `--draft-len` paragraph; benchmarks/draft_len.py).
DEFAULT_DRAFT_LEN = 6


@dataclass(slots=True)
class SpecParams:
    """Draft length policy. draft_len None: the drafter's own (`auto`'s, chosen with its
    variant on validation prompts), else DEFAULT_DRAFT_LEN. adaptive: grow k after a fully
    accepted draft, shrink it to what was accepted otherwise (within 1..draft_len). (An MTP
    drafter's own early stop on low confidence is its MTPDraftSource's min_confidence.)"""

    draft_len: int | None = None
    adaptive: bool = False

    def __post_init__(self):
        if self.draft_len is not None and not 1 <= self.draft_len <= 32:
            raise ValueError(f"draft_len must be in 1..32, got {self.draft_len}")


# The server (`mtpdraft serve`, serve.build_app, serve.BatchEngine). Its draft length
# stays 4: the verification forward is shared by all rows (README).
SERVE_HOST = "127.0.0.1"
SERVE_PORT = 8000
SERVE_MAX_BATCH = 8  # rows decoded together
SERVE_MAX_CONTEXT = 2048  # prompt + generated tokens per request
SERVE_DRAFT_LEN = 4
SERVE_SPEC_OFF_BATCH = 4  # drafting off from this many rows (0 = never; BatchEngine's own default is 0)
SERVE_MAX_QUEUE = 64  # requests waiting for a row before 429s
SERVE_DEFAULT_MAX_TOKENS = 16  # /v1/completions requests that give no max_tokens
SERVE_SHUTDOWN_TIMEOUT_S = 10.0  # seconds in-flight requests get to finish on shutdown


@dataclass(slots=True)
class Stats:
    """Per-call statistics. tau counts the target's own token: tokens / cycles."""

    prompt_tokens: int = 0
    tokens: int = 0  # all generated tokens (the first comes from the prefill)
    decode_tokens: int = 0  # tokens emitted by draft/verify cycles
    cycles: int = 0
    proposed_by_pos: list[int] = field(default_factory=list)
    accepted_by_pos: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    draft_s: float = 0.0  # the drafter's proposals
    verify_s: float = 0.0  # the target's forward, the acceptance test, its own token, the commit
    decode_s: float = 0.0  # draft_s + verify_s: what tokens_per_s divides by

    def record(self, proposed: int, accepted: int) -> None:
        for i in range(proposed):
            if i >= len(self.proposed_by_pos):
                self.proposed_by_pos.append(0)
                self.accepted_by_pos.append(0)
            self.proposed_by_pos[i] += 1
            self.accepted_by_pos[i] += i < accepted

    @property
    def mean_accepted_tokens(self) -> float:
        return self.decode_tokens / self.cycles if self.cycles else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / p for a, p in zip(self.accepted_by_pos, self.proposed_by_pos)]

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens, "num_tokens": self.tokens, "cycles": self.cycles,
            "mean_accepted_tokens": round(self.mean_accepted_tokens, 4),
            "acceptance_by_position": [round(a, 4) for a in self.acceptance_by_position],
            "proposed_by_position": list(self.proposed_by_pos),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "prefill_s": round(self.prefill_s, 4), "draft_s": round(self.draft_s, 4),
            "verify_s": round(self.verify_s, 4), "decode_s": round(self.decode_s, 4),
        }
