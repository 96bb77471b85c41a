"""OpenAI-compatible HTTP server with continuous-batching speculative decoding (`mtpdraft serve`)."""

from __future__ import annotations

from ..config import (DEFAULT_WEIGHTS, SERVE_DEFAULT_MAX_TOKENS, SERVE_DRAFT_LEN, SERVE_MAX_BATCH, SERVE_MAX_CONTEXT,
                      SERVE_MAX_QUEUE, SERVE_SHUTDOWN_TIMEOUT_S, SERVE_SPEC_OFF_BATCH)
from .engine import BatchEngine, GenRequest
from .metrics import Metrics


def build_app(model: str, *, drafter: str = "auto", dtype: str = DEFAULT_WEIGHTS, max_batch: int = SERVE_MAX_BATCH,
              max_context: int = SERVE_MAX_CONTEXT, draft_len: int = SERVE_DRAFT_LEN, adaptive: bool = False,
              max_queue: int = SERVE_MAX_QUEUE, spec_off_batch: int = SERVE_SPEC_OFF_BATCH,
              default_max_tokens: int = SERVE_DEFAULT_MAX_TOKENS, shutdown_timeout: float = SERVE_SHUTDOWN_TIMEOUT_S):
    """Load the model and return (FastAPI app, engine). The engine runs from here on, on its own
    thread (the one that loaded the model); the app's lifespan stops it at shutdown."""
    from .. import load
    from .app import create_app

    # the engine's thread loads the model and does all of its work (BatchEngine.launch: one
    # OpenMP pool; the server's other threads never run torch)
    engine = BatchEngine.launch(lambda: load(model, dtype), drafter=drafter, max_batch=max_batch,
                                max_context=max_context, draft_len=draft_len, adaptive=adaptive, max_queue=max_queue,
                                spec_off_batch=spec_off_batch)
    return create_app(engine, engine.model.name, default_max_tokens=default_max_tokens,
                      shutdown_timeout=shutdown_timeout), engine


__all__ = ["BatchEngine", "GenRequest", "Metrics", "build_app"]
