"""Model families, found from config.json's `model_type` (one file per family)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

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
# Weight formats beyond plain dtypes: "gguf" = the GGUF file's own quantized blocks
# (a converted GGUF directory's quant.safetensors), "q8_0" = quantized at load (cached),
# "auto" = gguf where the directory has it, else bf16.
from ..config import DEFAULT_WEIGHTS, WEIGHT_CHOICES as WEIGHT_FORMATS  # noqa: E402
QUANT_FILE = "quant.safetensors"
QUANT_FORMAT = "mtpdraft-quant-3"  # 3: panels of 16 rows


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"unsupported dtype {dtype}; use bf16 or fp32")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(WEIGHT_FORMATS)}")
    return DTYPES[dtype]


def resolve_format(path: Path, dtype: str | torch.dtype) -> str:
    """The weight format `dtype` means for the directory at `path` (auto -> gguf | bf16)."""
    if isinstance(dtype, torch.dtype):
        parse_dtype(dtype)
        return "bf16" if dtype == torch.bfloat16 else "fp32"
    if dtype not in WEIGHT_FORMATS and dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(WEIGHT_FORMATS)}")
    if dtype == "auto":
        return "gguf" if (Path(path) / QUANT_FILE).is_file() else "bf16"
    if dtype == "gguf" and not (Path(path) / QUANT_FILE).is_file():
        raise ValueError(f"--dtype gguf: {path} was not converted from a GGUF file (no {QUANT_FILE}); "
                         "use q8_0, bf16 or fp32")
    return {"bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)


def save_quant(path: Path, quant: dict[str, "object"]) -> None:
    """Write QWeights (name -> kernels.QWeight with one part) as uint8 safetensors."""
    tensors, meta = {}, {}
    for name, q in quant.items():
        if len(q.parts) != 1:
            raise ValueError(f"{name}: only single-type weights are saved")
        tensors[name] = q.parts[0].contiguous()
        meta[name] = [q.types[0], int(q.shape[1])]
    save_file(tensors, str(path), metadata={"format": QUANT_FORMAT, "weights": json.dumps(meta)})


def _quant_meta(path: Path) -> dict:
    """A quant file's header: {name: [type, K]} (ValueError if it is not one of ours)."""
    try:
        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"malformed quantized weights file {path}: {e}") from e
    if md.get("format") != QUANT_FORMAT:
        raise ValueError(f"malformed quantized weights file {path}: not an {QUANT_FORMAT} file")
    return json.loads(md["weights"])


def load_quant(path: Path) -> dict[str, "object"]:
    from ..kernels import QWeight

    meta = _quant_meta(path)
    try:
        with safe_open(str(path), "pt") as f:
            return {name: QWeight([f.get_tensor(name)], [t], k) for name, (t, k) in meta.items()}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"malformed quantized weights file {path}: {e}") from e


def quant_summary(path: Path) -> "tuple[str, int] | None":
    """(types, bytes) of a directory's GGUF-quantized weights, read from the file header only."""
    f = Path(path) / QUANT_FILE
    if not f.is_file():
        return None
    return "+".join(sorted({t for t, _ in _quant_meta(f).values()})), f.stat().st_size


def quantizable(model: CausalLM) -> set[str]:
    """Names of the matrices a quantized format stores quantized: every Linear weight
    and the embedding table with rows a multiple of 16 and input width a multiple of 32."""
    from ..kernels.quant import supported
    from ..layers import Linear

    names = {n + ".weight" for n, m in model.named_modules() if isinstance(m, Linear)}
    names.add("model.embed_tokens.weight")
    params = dict(model.named_parameters())
    return {n for n in names if n in params and params[n].ndim == 2 and supported("Q8_0", *params[n].shape)}


def _q8_0_cache(path: Path) -> Path:
    files = sorted(Path(path).glob("*.safetensors"))
    h = hashlib.sha1(str(Path(path).resolve()).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    from ..registry import cache_root

    return cache_root() / "quant" / f"{Path(path).resolve().name}-{h.hexdigest()[:12]}" / "q8_0.safetensors"


def quantize_q8_0(model: CausalLM, weights: dict[str, torch.Tensor], path: Path, cache: Path) -> dict[str, "object"]:
    """Q8_0 copies of the quantizable matrices, saved to `cache` for later loads."""
    from ..kernels import QWeight

    print(f"mtpdraft: quantizing {path.name} to q8_0 (once)...", file=sys.stderr, flush=True)
    quant = {}
    for name in sorted(quantizable(model)):
        quant[name] = QWeight.q8_0(weights[name])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    save_quant(tmp, quant)
    tmp.replace(cache)
    return quant


def family_of(config: dict):
    mt = config.get("model_type")
    if mt not in FAMILIES:
        raise ValueError(f"unsupported architecture model_type={mt!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[mt]


def build_model(config: dict) -> CausalLM:
    """An empty model (uninitialized weights) for `config`."""
    family = family_of(config)
    return family.Model(family.ModelArgs.from_config(config))


def load_safetensors_dir(path: Path, skip: "set[str] | frozenset[str]" = frozenset()) -> dict[str, torch.Tensor]:
    """Every tensor of the *.safetensors files in `path` except the names in `skip`
    (pickled weights are never read; mtpdraft's own quant file is not a checkpoint)."""
    files = sorted(f for f in Path(path).glob("*.safetensors") if f.name != QUANT_FILE)
    if not files:
        raise FileNotFoundError(f"{path} has no .safetensors weights (pickled .bin files are not loaded)")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if not skip:
                weights.update(load_file(str(f)))
                continue
            with safe_open(str(f), "pt") as sf:
                for k in sf.keys():
                    if k not in skip:
                        weights[k] = sf.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"malformed checkpoint file {f}: {e}") from e
    return weights


def load_model_dir(path: str | Path, dtype: str | torch.dtype = DEFAULT_WEIGHTS) -> CausalLM:
    """Load a local HF-style directory (config.json + *.safetensors).

    dtype: bf16 | fp32 (weights in that dtype), gguf (the quantized blocks of the GGUF
    file the directory was converted from), q8_0 (quantized at load, cached), or auto
    (gguf where available, else bf16). Quantized formats keep bf16 KV caches."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json")
    fmt = resolve_format(path, dtype)
    config = json.loads(cfg_file.read_text())
    family = family_of(config)  # an unsupported architecture is reported before any weight is read
    model = build_model(config)
    quant = None
    q8_cache = _q8_0_cache(path) if fmt == "q8_0" else None
    if fmt == "gguf":
        quant = load_quant(path / QUANT_FILE)
    elif q8_cache is not None and q8_cache.is_file():
        try:
            quant = load_quant(q8_cache)
        except ValueError:  # an older layout: quantized again below
            quant = None
    # quantized matrices are not read in dense form (names as stored: GGUF conversions and our own caches)
    weights = family.sanitize(load_safetensors_dir(path, skip=set(quant or ())))
    if model.args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    if fmt == "q8_0" and quant is None:
        quant = quantize_q8_0(model, weights, path, q8_cache)
    if quant:
        weights = {k: v for k, v in weights.items() if k not in quant}
    model.load_weights(weights, torch.float32 if fmt == "fp32" else torch.bfloat16, quant)
    return model.eval()


__all__ = ["CausalLM", "ForwardOut", "FAMILIES", "WEIGHT_FORMATS", "build_model", "load_model_dir",
           "load_safetensors_dir", "parse_dtype", "resolve_format"]
