"""mtpdraft: lossless speculative decoding with multi-token-prediction drafters."""

from __future__ import annotations

from .config import DEFAULT_WEIGHTS
from .models import CausalLM, load_model_dir, parse_dtype
from .registry import BUNDLED, DEFAULT_MODEL, resolve

__version__ = "0.1.0"


def load(model: str = DEFAULT_MODEL, dtype: str = DEFAULT_WEIGHTS):
    """Load a bundled name, a local HF directory or a .gguf: returns (model, tokenizer).

    dtype: auto (the GGUF's own quantized weights where the model came from a GGUF file,
    else bf16), gguf, q8_0 (quantized at load, cached), bf16 or fp32."""
    from transformers import AutoTokenizer

    name, path = resolve(model)
    lm = load_model_dir(path, dtype)
    lm.name = name
    lm.path = path
    tok = AutoTokenizer.from_pretrained(str(path))
    return lm, tok


__all__ = ["load", "CausalLM", "BUNDLED", "DEFAULT_MODEL", "resolve", "load_model_dir", "parse_dtype"]
