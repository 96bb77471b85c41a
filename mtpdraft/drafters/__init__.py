"""Drafters: the MTP drafter and the n-gram lookup drafter behind one interface."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .. import kernels
from ..models.base import CausalLM
from .base import Draft, DraftContext, Drafter
from .combined import ByTemperature, CombinedDrafter, draft_len_for, for_request
from .datastore import Datastore, DatastoreDrafter, is_datastore
from .gemma4_assistant import is_gemma4_assistant, load_gemma4_assistant
from .mtp import MTPConfig, MTPDrafter, MTPDraftSource
from .ngram import NgramDrafter

SHIPPED_DIR = Path(__file__).parent / "shipped"


def shipped_drafter_dir(model_name: str) -> Path | None:
    """The drafter shipped in the package for a bundled model, if any."""
    d = SHIPPED_DIR / model_name
    return d if (d / "config.json").is_file() else None


def make_drafter(spec: str, target: CausalLM, model_name: str = "", min_confidence: float = 0.0) -> Drafter | None:
    """--drafter values: none | ngram | auto | PATH to a drafter dir | PATH to a datastore file.

    auto: the MTP drafter shipped for the model, as its auto.json says (chosen on
    validation prompts when it was shipped): combined with prompt lookup (n-gram
    proposals when the text repeats, MTP otherwise; the default) or alone; without a
    shipped drafter, prompt lookup alone (free to run, lossless, a speedup on most text).
    A datastore file (`mtpdraft datastore`): prompt lookup on any match, else the store.
    """
    return drafter_factory(spec, target, model_name, min_confidence)()


def drafter_factory(spec: str, target: CausalLM, model_name: str = "",
                    min_confidence: float = 0.0) -> Callable[[], Drafter | None]:
    """make_drafter in two halves: this call resolves `spec` and loads what is heavy and
    read-only (an MTP drafter's weights, its quantized and cluster-ordered tables, its native
    step; a datastore and its index) once; each call of the result builds a fresh drafter on
    them, with its own per-sequence state (the n-gram index, round counts): a server's drafter
    per request at the cost of a few small objects, not a checkpoint load. Bad specs fail here."""
    if spec == "none":
        return lambda: None
    # a drafter's outputs are only lossless with the batch-invariant kernels: no silent fallback
    kernels.require_native(f"--drafter {spec}")
    if spec == "ngram":
        return NgramDrafter
    if spec == "auto":
        path = shipped_drafter_dir(model_name)
        if path is None:
            return NgramDrafter
        # the combination and confidence gate chosen when the drafter was shipped; "sampled":
        # the one chosen for temperature > 0, if it differs
        auto = json.loads((path / "auto.json").read_text()) if (path / "auto.json").is_file() else {}
        source = _load_source(path, target, 0.0)
        greedy_len = _draft_len(auto, path, "draft_len")  # the draft length the variant was chosen with
        samp = auto.get("sampled")
        if samp is not None and not isinstance(samp, dict):
            raise ValueError(f"{path / 'auto.json'}: \"sampled\" must be an object, got {samp!r}")
        sampled_len = _draft_len(samp, path, "sampled.draft_len") if samp else greedy_len
        variant = lambda cfg: _auto_variant(cfg, source, min_confidence, path)  # noqa: E731

        def auto_drafter() -> Drafter | None:
            greedy = variant(auto)
            if samp is None and greedy_len is None:
                return greedy
            sampled = variant(samp) if samp else greedy
            if greedy is None and sampled is None:
                return None
            return ByTemperature(greedy, sampled, greedy_len=greedy_len, sampled_len=sampled_len)

        auto_drafter()  # validates auto.json's variants now
        return auto_drafter
    path = Path(spec)
    if path.is_file() and is_datastore(path):
        store = Datastore.shared(path)
        store.check_target(target)
        return lambda: CombinedDrafter(None, min_match=1, store=DatastoreDrafter(store))
    if not path.is_dir():
        raise ValueError(f"unknown drafter {spec!r}: use none, auto, ngram, a drafter directory or a datastore file")
    source = _load_source(path, target, min_confidence)
    return lambda: MTPDraftSource(source.drafter, source.min_confidence)


def _draft_len(cfg: dict, path: Path, name: str) -> int | None:
    v = cfg.get("draft_len")
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 32):
        raise ValueError(f"{path / 'auto.json'}: {name} must be an integer in 1..32, got {v!r}")
    return v


def _auto_variant(cfg: dict, source: MTPDraftSource, min_confidence: float, path: Path) -> Drafter | None:
    """One of auto.json's variants: mtp | combined (with its gate, n-gram match length and MTP
    draft cap) | ngram | none (no draft: plain decoding measured fastest); `source` is shared."""
    kind = cfg.get("drafter", "combined")
    if kind == "ngram":
        return NgramDrafter()
    if kind == "none":
        return None
    if kind not in ("combined", "mtp"):
        raise ValueError(f"{path / 'auto.json'}: unknown drafter {kind!r} (combined, mtp, ngram or none)")
    gated = MTPDraftSource(source.drafter, min_confidence or float(cfg.get("min_confidence", 0.0)))
    if kind == "mtp":
        return gated
    mtp_len = cfg.get("mtp_len")
    return CombinedDrafter(gated, min_match=int(cfg.get("min_match", 2)),
                           mtp_len=None if mtp_len is None else int(mtp_len))


def _load_source(path: Path, target: CausalLM, min_confidence: float) -> MTPDraftSource:
    """An MTP drafter directory (ours or an official Gemma 4 assistant), checked against the target;
    with Q8_0 matrices where the target's weights are quantized."""
    if is_gemma4_assistant(path):  # an official Gemma 4 `-assistant` checkpoint
        d = load_gemma4_assistant(path, target.dtype, target=target)
    else:
        d = MTPDrafter.load(path, dtype=target.dtype)
        d.check_target(target)
    if target.quantized and d.can_quantize():  # drafts at the target's kind of weights: half bf16's bytes a token
        d.quantize()
    d.native_step(target)  # built now (the cluster-ordered table with it), not on the first draft
    return MTPDraftSource(d, min_confidence=min_confidence)


__all__ = ["Datastore", "DatastoreDrafter", "Draft", "DraftContext", "Drafter", "MTPConfig", "MTPDrafter",
           "MTPDraftSource", "NgramDrafter", "draft_len_for", "drafter_factory", "for_request", "make_drafter",
           "shipped_drafter_dir"]
