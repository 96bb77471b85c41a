"""OpenAI-compatible HTTP server with continuous-batching speculative decoding (`mtpdraft serve`)."""

from __future__ import annotations

from ..config import DEFAULT_WEIGHTS
from .engine import BatchEngine, GenRequest
from .metrics import Metrics


def build_app(model: str, *, drafter: str = "auto", dtype: str = DEFAULT_WEIGHTS, max_batch: int = 8,
              max_context: int = 2048, draft_len: int = 4, adaptive: bool = False, max_queue: int = 64,
              spec_off_batch: int = 4, default_max_tokens: int = 16, shutdown_timeout: float = 10.0):
    """Load the model and return (FastAPI app, engine); the app's lifespan starts and stops the engine."""
    from .. import load
    from .app import create_app

    lm, tok = load(model, dtype)
    engine = BatchEngine(lm, tok, drafter=drafter, max_batch=max_batch, max_context=max_context,
                         draft_len=draft_len, adaptive=adaptive, max_queue=max_queue, spec_off_batch=spec_off_batch)
    return create_app(engine, lm.name, default_max_tokens=default_max_tokens,
                      shutdown_timeout=shutdown_timeout), engine


__all__ = ["BatchEngine", "GenRequest", "Metrics", "build_app"]
