"""Drafters: the MTP drafter and the n-gram lookup drafter behind one interface."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.base import CausalLM
from .base import Draft, DraftContext, Drafter
from .gemma4_assistant import is_gemma4_assistant, load_gemma4_assistant
from .mtp import MTPConfig, MTPDrafter, MTPDraftSource
from .ngram import NgramDrafter

SHIPPED_DIR = Path(__file__).parent / "shipped"


def shipped_drafter_dir(model_name: str) -> Path | None:
    """The drafter shipped in the package for a bundled model, if any."""
    d = SHIPPED_DIR / model_name
    return d if (d / "config.json").is_file() else None


def make_drafter(spec: str, target: CausalLM, model_name: str = "", min_confidence: float = 0.0) -> Drafter | None:
    """--drafter values: none | ngram | auto (the shipped drafter, else none) | PATH to a drafter dir."""
    if spec == "none":
        return None
    if spec == "ngram":
        return NgramDrafter()
    if spec == "auto":
        path = shipped_drafter_dir(model_name)
        if path is None:
            return None
    else:
        path = Path(spec)
        if not path.is_dir():
            raise ValueError(f"unknown drafter {spec!r}: use none, auto, ngram or a drafter directory")
    if is_gemma4_assistant(path):  # an official Gemma 4 `-assistant` checkpoint
        return MTPDraftSource(load_gemma4_assistant(path, target.dtype, target=target), min_confidence)
    d = MTPDrafter.load(path, dtype=target.dtype)
    d.check_target(target)
    return MTPDraftSource(d, min_confidence=min_confidence)


__all__ = ["Draft", "DraftContext", "Drafter", "MTPConfig", "MTPDrafter", "MTPDraftSource", "NgramDrafter",
           "make_drafter", "shipped_drafter_dir"]
