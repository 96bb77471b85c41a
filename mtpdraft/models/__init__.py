"""Model families, found from config.json's `model_type` (one file per family)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import gemma3, gemma4, llama
from .base import CausalLM, ForwardOut

FAMILIES = {
    "gemma3_text": gemma3,
    "gemma3": gemma3,
    "gemma4_text": gemma4, "gemma4": gemma4,
    "llama": llama,
    "mistral": llama,
}

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"unsupported dtype {dtype}; use bf16 or fp32")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use bf16 or fp32")
    return DTYPES[dtype]


def family_of(config: dict):
    mt = config.get("model_type")
    if mt not in FAMILIES:
        raise ValueError(f"unsupported architecture model_type={mt!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[mt]


def build_model(config: dict) -> CausalLM:
    """An empty model (uninitialized weights) for `config`."""
    family = family_of(config)
    return family.Model(family.ModelArgs.from_config(config))


def load_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the *.safetensors files in `path` (pickled weights are never read)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no .safetensors weights (pickled .bin files are not loaded)")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"malformed checkpoint file {f}: {e}") from e
    return weights


def load_model_dir(path: str | Path, dtype: str | torch.dtype = "bf16") -> CausalLM:
    """Load a local HF-style directory (config.json + *.safetensors)."""
    path, dtype = Path(path), parse_dtype(dtype)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json")
    config = json.loads(cfg_file.read_text())
    family = family_of(config)  # an unsupported architecture is reported before any weight is read
    weights = load_safetensors_dir(path)
    model = build_model(config)
    weights = family.sanitize(weights)
    if model.args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    model.load_weights(weights, dtype)
    return model.eval()


__all__ = ["CausalLM", "ForwardOut", "FAMILIES", "build_model", "load_model_dir", "load_safetensors_dir",
           "parse_dtype"]
