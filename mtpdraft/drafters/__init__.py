"""Drafters: the MTP drafter and the n-gram lookup drafter behind one interface."""

from __future__ import annotations

import json
from pathlib import Path

from .. import kernels
from ..models.base import CausalLM
from .base import Draft, DraftContext, Drafter
from .combined import CombinedDrafter
from .gemma4_assistant import is_gemma4_assistant, load_gemma4_assistant
from .mtp import MTPConfig, MTPDrafter, MTPDraftSource
from .ngram import NgramDrafter

SHIPPED_DIR = Path(__file__).parent / "shipped"


def shipped_drafter_dir(model_name: str) -> Path | None:
    """The drafter shipped in the package for a bundled model, if any."""
    d = SHIPPED_DIR / model_name
    return d if (d / "config.json").is_file() else None


def make_drafter(spec: str, target: CausalLM, model_name: str = "", min_confidence: float = 0.0) -> Drafter | None:
    """--drafter values: none | ngram | auto | PATH to a drafter dir.

    auto: the MTP drafter shipped for the model, as its auto.json says (chosen on
    validation prompts when it was shipped): combined with prompt lookup (n-gram
    proposals when the text repeats, MTP otherwise; the default) or alone; without a
    shipped drafter, prompt lookup alone (free to run, lossless, a speedup on most text).
    """
    if spec == "none":
        return None
    # a drafter's outputs are only lossless with the batch-invariant kernels: no silent fallback
    kernels.require_native(f"--drafter {spec}")
    if spec == "ngram":
        return NgramDrafter()
    if spec == "auto":
        path = shipped_drafter_dir(model_name)
        if path is None:
            return NgramDrafter()
        # the combination and confidence gate chosen when the drafter was shipped
        auto = json.loads((path / "auto.json").read_text()) if (path / "auto.json").is_file() else {}
        source = _load_source(path, target, min_confidence or float(auto.get("min_confidence", 0.0)))
        kind = auto.get("drafter", "combined")
        if kind not in ("combined", "mtp"):
            raise ValueError(f"{path / 'auto.json'}: unknown drafter {kind!r} (combined or mtp)")
        return source if kind == "mtp" else CombinedDrafter(source, min_match=int(auto.get("min_match", 2)))
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"unknown drafter {spec!r}: use none, auto, ngram or a drafter directory")
    return _load_source(path, target, min_confidence)


def _load_source(path: Path, target: CausalLM, min_confidence: float) -> MTPDraftSource:
    """An MTP drafter directory (ours or an official Gemma 4 assistant), checked against the target."""
    if is_gemma4_assistant(path):  # an official Gemma 4 `-assistant` checkpoint
        return MTPDraftSource(load_gemma4_assistant(path, target.dtype, target=target), min_confidence)
    d = MTPDrafter.load(path, dtype=target.dtype)
    d.check_target(target)
    return MTPDraftSource(d, min_confidence=min_confidence)


__all__ = ["Draft", "DraftContext", "Drafter", "MTPConfig", "MTPDrafter", "MTPDraftSource", "NgramDrafter",
           "make_drafter", "shipped_drafter_dir"]
