"""Batch-invariant CPU kernels (AVX2 + FMA) for lossless speculative decoding.

``linear`` and ``attention`` compute every output row with a fixed sequence of
floating point operations that does not depend on how many rows are processed
together (nor on the other rows' contents).  Verification of k+1 draft tokens in
one forward therefore reproduces plain one-token decoding bit for bit.

The C++ source (``mtpdraft_kernels.cpp``, shipped beside this file) is compiled
on first use with ``torch.utils.cpp_extension`` into ``$MTPDRAFT_CACHE/kernels``
(default ``~/.cache/mtpdraft/kernels``).  If that fails (no compiler, no AVX2/FMA,
``MTPDRAFT_NO_NATIVE=1``) the pure-torch reference implementations are used, with
a warning: batch invariance is then NOT guaranteed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "linear",
    "attention",
    "reference_linear",
    "reference_attention",
    "native_available",
]

_SRC = Path(__file__).with_name("mtpdraft_kernels.cpp")
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"]
# -fopenmp links libgomp.so.1 by soname; torch has already loaded its own
# libgomp.so.1, so the dynamic loader reuses it (one OpenMP runtime, torch's pool).
_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_native = None  # loaded module, or False once loading failed
_fail_reason = ""


# ---------------------------------------------------------------------------
# reference implementations (pure torch; also the fallback)
# ---------------------------------------------------------------------------
def reference_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y = x @ w.T in fp32 (x: [N, K] float32, w: [O, K] float32/bfloat16) -> [N, O] float32."""
    return F.linear(x.float(), w.float())


def reference_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    *,
    window: int = 0,
    scale: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Same semantics as :func:`attention`, computed with ordinary torch ops."""
    B, N, H, D = q.shape
    C, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv
    k = k_cache.float()
    v = v_cache.float()
    if G > 1:
        k = k.repeat_interleave(G, dim=2)
        v = v.repeat_interleave(G, dim=2)
    logits = torch.einsum("bnhd,bchd->bnhc", q.float(), k) * scale
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    pos = positions.to(device=q.device, dtype=torch.long)[..., None]  # [B, N, 1]
    slots = torch.arange(C, device=q.device)
    keypos = pos - torch.remainder(pos - slots, C)  # absolute position held by each slot, <= p
    if window > 0:
        lo = (pos - window + 1).clamp(min=0)
    else:
        lo = torch.zeros_like(pos)
    valid = keypos >= lo  # [B, N, C]
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1)
    return torch.einsum("bnhc,bchd->bnhd", p, v)


# ---------------------------------------------------------------------------
# native extension loading
# ---------------------------------------------------------------------------
def _cache_dir() -> Path:
    base = os.environ.get("MTPDRAFT_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "mtpdraft"
    return root / "kernels"


def _cpu_ok() -> str:
    """Empty string if the CPU has AVX2 + FMA (or we cannot tell), else a reason."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    missing = [fl for fl in ("avx2", "fma") if fl not in flags]
                    return f"CPU lacks {', '.join(missing)}" if missing else ""
    except OSError:
        pass
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"unsupported architecture {platform.machine()}"
    return ""


def _module_name() -> str:
    h = hashlib.sha1()
    h.update(_SRC.read_bytes())
    h.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return "mtpdraft_kernels_" + h.hexdigest()[:12]


def _load():
    global _native, _fail_reason
    if _native is not None:
        return _native
    with _lock:
        if _native is not None:
            return _native
        try:
            if os.environ.get("MTPDRAFT_NO_NATIVE", "") not in ("", "0"):
                raise RuntimeError("disabled by MTPDRAFT_NO_NATIVE")
            reason = _cpu_ok()
            if reason:
                raise RuntimeError(reason)
            name = _module_name()
            build_dir = _cache_dir() / name
            so_path = build_dir / f"{name}.so"
            mod = None
            if so_path.exists():
                try:
                    spec = importlib.util.spec_from_file_location(name, so_path)
                    mod = importlib.util.module_from_spec(spec)
                    spec.loader.exec_module(mod)
                except Exception:  # stale / broken build: rebuild below
                    mod = None
            if mod is None:
                from torch.utils.cpp_extension import load

                build_dir.mkdir(parents=True, exist_ok=True)
                print("mtpdraft: compiling CPU kernels (once, ~1 min)...", file=sys.stderr, flush=True)
                mod = load(
                    name=name,
                    sources=[str(_SRC)],
                    extra_cflags=_CFLAGS,
                    extra_ldflags=_LDFLAGS,
                    build_directory=str(build_dir),
                    verbose=False,
                )
            _native = mod
        except Exception as e:  # noqa: BLE001 - any failure means fallback
            _native = False
            _fail_reason = f"{type(e).__name__}: {e}"
            warnings.warn(
                "mtpdraft: native CPU kernels unavailable "
                f"({_fail_reason.splitlines()[0] if _fail_reason else ''}); "
                "falling back to plain torch ops -- batch invariance is NOT guaranteed, "
                "so speculative decoding may not be bit-identical to plain decoding.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _native


def native_available() -> bool:
    """True if the compiled batch-invariant kernels are in use (compiles them on first call)."""
    return bool(_load())


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------
def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y = x @ w.T.  x: [N, K] float32; w: [O, K] float32 or bfloat16, contiguous.

    Returns [N, O] float32.  Row i depends only on x[i] and w, bit for bit, for any N >= 1.
    """
    mod = _native if _native is not None else _load()
    if mod and x.device.type == "cpu" and w.device.type == "cpu":
        if x.dtype != torch.float32:
            x = x.float()
        if w.dtype not in (torch.float32, torch.bfloat16):
            w = w.float()
        return mod.linear(x, w)
    return reference_linear(x, w)


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    *,
    window: int = 0,
    scale: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Causal (optionally sliding-window) GQA attention over a ring-buffer KV cache.

    q: [B, N, H, D] float32; k_cache, v_cache: [B, C, Hkv, D] float32 or bfloat16, the
    entry of absolute position j in slot j % C; positions: [B, N] int64.  Query at
    position p attends to positions lo..p, lo = max(0, p - window + 1) if window > 0
    else 0.  Query head h uses kv head h // (H // Hkv).  Returns [B, N, H, D] float32;
    each (b, i, h) result is bit-identical whatever N, B and the other rows are.
    """
    mod = _native if _native is not None else _load()
    if mod and q.device.type == "cpu":
        if q.dtype != torch.float32:
            q = q.float()
        if k_cache.dtype not in (torch.float32, torch.bfloat16):
            k_cache = k_cache.float()
        if v_cache.dtype != k_cache.dtype:
            v_cache = v_cache.to(k_cache.dtype)
        return mod.attention(q, k_cache, v_cache, positions, int(window), float(scale), float(softcap))
    return reference_attention(q, k_cache, v_cache, positions, window=window, scale=scale, softcap=softcap)
