"""Command-line arguments every model-running command shares, declared once."""

from __future__ import annotations

import argparse

from .config import DEFAULT_DRAFT_LEN, DEFAULT_WEIGHTS, WEIGHT_CHOICES

WEIGHTS_HELP = ("weights: auto = the GGUF's own quantized blocks where the model came from one, else bf16; "
                "q8_0 quantizes at load (cached); bf16/fp32 dense")


def add_model_args(p: argparse.ArgumentParser, *, drafter: str = "auto", draft_len: int | None = None,
                   adaptive_help: str = "adapt the draft length to observed acceptance") -> None:
    """--model, --dtype, --drafter (default `drafter`), --draft-len (default `draft_len`,
    None = auto's own, else DEFAULT_DRAFT_LEN) and --adaptive."""
    from .registry import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="bundled name, local HF directory or .gguf file")
    p.add_argument("--dtype", default=DEFAULT_WEIGHTS, choices=WEIGHT_CHOICES, help=WEIGHTS_HELP)
    p.add_argument("--drafter", default=drafter,
                   help="auto | none | ngram | PATH to a drafter directory | PATH to a datastore file (mtpdraft datastore)")
    p.add_argument("--draft-len", type=int, default=draft_len,
                   help=f"tokens drafted per cycle (default {draft_len}; --drafter auto caps it to its own)"
                   if draft_len
                   else f"tokens drafted per cycle (default: --drafter auto's own, chosen with its variant; "
                        f"else {DEFAULT_DRAFT_LEN}; auto caps a larger one to its own)")
    p.add_argument("--adaptive", action="store_true", help=adaptive_help)
