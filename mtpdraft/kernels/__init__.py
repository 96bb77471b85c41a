"""Batch-invariant CPU kernels (AVX2 + FMA) for lossless speculative decoding.

``linear`` (row-major or ``pack``ed weights), ``attention`` and the fused per-row
ops of a decoder layer (``rmsnorm``, ``add_rmsnorm``, ``gated_act``,
``qkv_rope_cache``) compute every output row with a fixed sequence of
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
    "Packed",
    "pack",
    "linear",
    "attention",
    "rmsnorm",
    "add_rmsnorm",
    "gated_act",
    "qkv_rope_cache",
    "apply_rope",
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
    """y = x @ w.T in fp32 (x: [..., K] float32, w: [O, K] float32/bfloat16) -> [..., O] float32."""
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


def reference_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    scale = w.float() + offset if offset else w.float()
    return F.rms_norm(x.float(), (x.shape[-1],), scale, eps)


def reference_add_rmsnorm(x, h, w_post, w_next, eps, offset=0.0):
    x = x + (reference_rmsnorm(h, w_post, eps, offset) if w_post is not None else h)
    return x, (reference_rmsnorm(x, w_next, eps, offset) if w_next is not None else None)


ACTS = {"gelu_tanh": 0, "silu": 1}


def reference_gated_act(gu: torch.Tensor, act: str) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=-1)
    return (F.gelu(gate, approximate="tanh") if act == "gelu_tanh" else F.silu(gate)) * up


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF convention and fp32 arithmetic). x: [B, N, H, D]; positions: [B, N]."""
    freqs = positions.unsqueeze(-1).float() * inv_freq  # [B, N, D/2]
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(2)  # [B, N, 1, D]
    half = x.shape[-1] // 2
    return x * emb.cos() + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * emb.sin()


def reference_qkv_rope_cache(qkv, positions, heads, kv_heads, q_norm, k_norm, eps, offset, inv_freq,
                             k_cache, v_cache):
    from ..cache import LayerCache

    B, N, _ = qkv.shape
    D = k_cache.shape[-1]
    q, k, v = qkv.split([heads * D, kv_heads * D, kv_heads * D], dim=-1)
    q, k, v = q.reshape(B, N, heads, D), k.reshape(B, N, kv_heads, D), v.reshape(B, N, kv_heads, D)
    if q_norm is not None:
        q = reference_rmsnorm(q, q_norm, eps, offset)
    if k_norm is not None:
        k = reference_rmsnorm(k, k_norm, eps, offset)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    LayerCache(k_cache, v_cache, 0).write(k, v, positions)
    return q


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
PACKED_MAX_ROWS = 16  # linear() uses the packed layout up to this many rows (speed only)


class Packed:
    """A weight in the native GEMV's packed layout (rows interleaved in blocks of 4,
    read as one sequential stream). `source` is the ordinary [O, K] weight; results
    are bit-identical to it. If the source changes after packing (in place or
    rebinding `.data`), linear() uses the source instead."""

    __slots__ = ("source", "data", "_key")

    def __init__(self, source: torch.Tensor, data: torch.Tensor):
        self.source, self.data = source, data
        self._key = (source.data_ptr(), source._version)

    @property
    def shape(self) -> torch.Size:
        return self.source.shape

    @property
    def fresh(self) -> bool:
        return (self.source.data_ptr(), self.source._version) == self._key


def pack(w: torch.Tensor) -> "Packed | torch.Tensor":
    """Pack a [O, K] fp32/bf16 CPU weight for linear(); returns w itself when the
    native kernels are unavailable or K does not fit the layout."""
    mod = _native if _native is not None else _load()
    kc = 16 if w.dtype == torch.bfloat16 else 8
    if (not mod or w.device.type != "cpu" or w.dim() != 2 or w.dtype not in (torch.float32, torch.bfloat16)
            or w.shape[1] % kc):
        return w
    return Packed(w, mod.pack_weight(w.detach()))


def linear(x: torch.Tensor, w: "torch.Tensor | Packed") -> torch.Tensor:
    """y = x @ w.T.  x: [..., K] float32; w: [O, K] float32 or bfloat16, contiguous.

    Returns [..., O] float32.  Each row depends only on its x row and w, bit for bit,
    however many rows there are.
    """
    mod = _native if _native is not None else _load()
    if isinstance(w, Packed):
        # decode and verification sizes: the packed kernels stream the weights once and
        # overlap that with the arithmetic; prefill uses the row-major kernel. Same bits.
        if mod and w.fresh and x.device.type == "cpu" and x.numel() <= PACKED_MAX_ROWS * x.shape[-1]:
            return mod.linear_packed(x if x.dtype == torch.float32 else x.float(), w.data, w.shape[0])
        w = w.source
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


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """Row-wise RMSNorm in fp32: x / rms(x) * (w + offset); x: [..., D]."""
    mod = _native if _native is not None else _load()
    if mod and x.dtype == torch.float32 and x.device.type == "cpu":
        return mod.rmsnorm(x, w, eps, offset)
    return reference_rmsnorm(x, w, eps, offset)


def add_rmsnorm(x, h, w_post, w_next, eps: float, offset: float = 0.0):
    """A block's residual step: x' = x + (rmsnorm(h, w_post) if w_post is given else h),
    y = rmsnorm(x', w_next) (None without w_next). Returns (x', y)."""
    mod = _native if _native is not None else _load()
    if mod and x.dtype == torch.float32 and h.dtype == torch.float32 and x.device.type == "cpu":
        out = mod.add_rmsnorm(x, h, w_post, w_next, eps, offset)
        return out[0], (out[1] if len(out) > 1 else None)
    return reference_add_rmsnorm(x, h, w_post, w_next, eps, offset)


def gated_act(gu: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up for gu = [gate | up] on the last dim; act: gelu_tanh | silu."""
    mod = _native if _native is not None else _load()
    if mod and gu.dtype == torch.float32 and gu.device.type == "cpu":
        return mod.gated_act(gu, ACTS[act])
    return reference_gated_act(gu, act)


def qkv_rope_cache(qkv, positions, heads: int, kv_heads: int, q_norm, k_norm, eps: float, offset: float,
                   inv_freq, k_cache, v_cache) -> torch.Tensor:
    """After the fused projection qkv [B, N, (H + 2 Hkv) D]: optional per-head q/k RMSNorm,
    rotate-half RoPE at `positions` [B, N], k and v written to the ring-buffer cache
    (slot = position % C). Returns q [B, N, H, D]."""
    mod = _native if _native is not None else _load()
    if mod and qkv.dtype == torch.float32 and qkv.device.type == "cpu":
        return mod.qkv_rope_cache(qkv, positions, heads, kv_heads, q_norm, k_norm, eps, offset, inv_freq,
                                  k_cache, v_cache)
    return reference_qkv_rope_cache(qkv, positions, heads, kv_heads, q_norm, k_norm, eps, offset, inv_freq,
                                    k_cache, v_cache)
