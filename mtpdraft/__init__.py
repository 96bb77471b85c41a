"""mtpdraft: lossless speculative decoding with multi-token-prediction drafters."""

from __future__ import annotations

from .models import CausalLM, load_model_dir, parse_dtype
from .registry import BUNDLED, DEFAULT_MODEL, resolve

__version__ = "0.1.0"


def load(model: str = DEFAULT_MODEL, dtype: str = "bf16"):
    """Load a bundled name, a local HF directory or a .gguf: returns (model, tokenizer)."""
    from transformers import AutoTokenizer

    name, path = resolve(model)
    lm = load_model_dir(path, dtype)
    lm.name = name
    lm.path = path
    tok = AutoTokenizer.from_pretrained(str(path))
    return lm, tok


__all__ = ["load", "CausalLM", "BUNDLED", "DEFAULT_MODEL", "resolve", "load_model_dir", "parse_dtype"]
