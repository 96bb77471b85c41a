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
    "QWeight",
    "qlinear",
    "take_rows",
    "dense",
    "require_native",
    "quant_isa",
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
                             k_cache, v_cache, kv_mode: int = 0, v_norm: bool = False):
    from ..cache import LayerCache

    B, N, _ = qkv.shape
    D = k_cache.shape[-1]
    q = qkv[..., :heads * D].reshape(B, N, heads, D)
    if q_norm is not None:
        q = reference_rmsnorm(q, q_norm, eps, offset)
    q = apply_rope(q, positions, inv_freq)
    if kv_mode == 2:
        return q
    k = qkv[..., heads * D:(heads + kv_heads) * D].reshape(B, N, kv_heads, D)
    v = k if kv_mode == 1 else qkv[..., (heads + kv_heads) * D:].reshape(B, N, kv_heads, D)
    if k_norm is not None:
        k = reference_rmsnorm(k, k_norm, eps, offset)
    if v_norm:
        v = reference_rmsnorm(v, torch.ones(D), eps, 0.0)
    LayerCache(k_cache, v_cache, 0).write(apply_rope(k, positions, inv_freq), v, positions)
    return q


def reference_softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(x / cap)


# ---------------------------------------------------------------------------
# native extension loading
# ---------------------------------------------------------------------------
def _cache_dir() -> Path:
    base = os.environ.get("MTPDRAFT_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "mtpdraft"
    return root / "kernels"


def _cpu_ok() -> str:
    """Empty string if the CPU has AVX2 + FMA (or we cannot tell), else a reason."""
    flags = _cpu_flags()
    if flags:
        missing = [fl for fl in ("avx2", "fma") if fl not in flags]
        return f"CPU lacks {', '.join(missing)}" if missing else ""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"unsupported architecture {platform.machine()}"
    return ""


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _module_name(src: Path, prefix: str, cflags: list[str]) -> str:
    h = hashlib.sha1()
    h.update(src.read_bytes())
    for header in sorted(src.parent.glob("*.h")):  # the sources include them
        h.update(header.read_bytes())
    h.update(" ".join(cflags + _LDFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return prefix + h.hexdigest()[:12]


def _build(src: Path, prefix: str, cflags: list[str]):
    """Import the compiled `src` from the cache, compiling it first if needed."""
    name = _module_name(src, prefix, cflags)
    build_dir = _cache_dir() / name
    so_path = build_dir / f"{name}.so"
    if so_path.exists():
        try:
            spec = importlib.util.spec_from_file_location(name, so_path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
        except Exception:  # stale / broken build: rebuild below
            pass
    from torch.utils.cpp_extension import load

    build_dir.mkdir(parents=True, exist_ok=True)
    print(f"mtpdraft: compiling CPU kernels {src.stem} (once, ~1 min)...", file=sys.stderr, flush=True)
    # copies: load() extends the flag lists it is given (which would change later builds' cache keys)
    return load(name=name, sources=[str(src)], extra_cflags=list(cflags), extra_ldflags=list(_LDFLAGS),
                build_directory=str(build_dir), verbose=False)


def _check_native_allowed() -> None:
    """Raise (with the reason) when native kernels must not or cannot be used here."""
    if os.environ.get("MTPDRAFT_NO_NATIVE", "") not in ("", "0"):
        raise RuntimeError("disabled by MTPDRAFT_NO_NATIVE")
    reason = _cpu_ok()
    if reason:
        raise RuntimeError(reason)


def _load():
    global _native, _fail_reason
    if _native is not None:
        return _native
    with _lock:
        if _native is not None:
            return _native
        try:
            _check_native_allowed()
            _native = _build(_SRC, "mtpdraft_kernels_", _CFLAGS)
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
        self._key = (source.data_ptr(), version(source))

    @property
    def shape(self) -> torch.Size:
        return self.source.shape

    @property
    def fresh(self) -> bool:
        return (self.source.data_ptr(), version(self.source)) == self._key


def version(t: torch.Tensor) -> int:
    """t's version counter, which in-place updates (an optimizer step) bump; -1 for inference
    tensors, which have none (and cannot be updated in place outside inference mode)."""
    return -1 if t.is_inference() else t._version


def pack(w: torch.Tensor) -> "Packed | torch.Tensor":
    """Pack a [O, K] fp32/bf16 CPU weight for linear(); returns w itself when the
    native kernels are unavailable or K does not fit the layout."""
    if isinstance(w, QWeight):  # already in its kernel's layout
        return w
    mod = _native if _native is not None else _load()
    kc = 16 if w.dtype == torch.bfloat16 else 8
    if (not mod or w.device.type != "cpu" or w.dim() != 2 or w.dtype not in (torch.float32, torch.bfloat16)
            or w.shape[1] % kc):
        return w
    return Packed(w, mod.pack_weight(w.detach()))


def linear(x: torch.Tensor, w: "torch.Tensor | Packed | QWeight") -> torch.Tensor:
    """y = x @ w.T.  x: [..., K] float32; w: [O, K] float32 or bfloat16, contiguous, or
    a quantized QWeight.

    Returns [..., O] float32.  Each row depends only on its x row and w, bit for bit,
    however many rows there are.
    """
    if isinstance(w, QWeight):
        return qlinear(x, w)
    mod = _native if _native is not None else _load()
    if isinstance(w, Packed):
        # decode and verification sizes: the packed kernels stream the weights once and
        # overlap that with the arithmetic; prefill uses the row-major kernel. Same bits.
        if mod and w.fresh and x.is_cpu and x.numel() <= PACKED_MAX_ROWS * x.shape[-1]:
            return mod.linear_packed(x if x.dtype == torch.float32 else x.float(), w.data, w.shape[0])
        w = w.source
    if mod and x.is_cpu and w.is_cpu:
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
    if mod and q.is_cpu:
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
    if mod and x.dtype == torch.float32 and x.is_cpu:
        return mod.rmsnorm(x, w, eps, offset)
    return reference_rmsnorm(x, w, eps, offset)


def add_rmsnorm(x, h, w_post, w_next, eps: float, offset: float = 0.0):
    """A block's residual step: x' = x + (rmsnorm(h, w_post) if w_post is given else h),
    y = rmsnorm(x', w_next) (None without w_next). Returns (x', y)."""
    mod = _native if _native is not None else _load()
    if mod and x.dtype == torch.float32 and h.dtype == torch.float32 and x.is_cpu:
        out = mod.add_rmsnorm(x, h, w_post, w_next, eps, offset)
        return out[0], (out[1] if len(out) > 1 else None)
    return reference_add_rmsnorm(x, h, w_post, w_next, eps, offset)


def gated_act(gu: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up for gu = [gate | up] on the last dim; act: gelu_tanh | silu."""
    mod = _native if _native is not None else _load()
    if mod and gu.dtype == torch.float32 and gu.is_cpu:
        return mod.gated_act(gu, ACTS[act])
    return reference_gated_act(gu, act)


def ds_lookup(keys: torch.Tensor, keys2: torch.Tensor, order: torch.Tensor, tokens: torch.Tensor, ctx: list[int],
              k: int, min_match: int, max_matches: int, bits: int, min_share: float = 0.0) -> tuple[list[int], int]:
    """A datastore's lookup (drafters/datastore.py): (draft, matched suffix length)."""
    require_native("the datastore drafter")
    return _native.ds_lookup(keys, keys2, order, tokens, ctx, k, min_match, max_matches, bits, min_share)


def qkv_rope_cache(qkv, positions, heads: int, kv_heads: int, q_norm, k_norm, eps: float, offset: float,
                   inv_freq, k_cache, v_cache, kv_mode: int = 0, v_norm: bool = False) -> torch.Tensor:
    """After the fused projection qkv [B, N, (H + 2 Hkv) D]: optional per-head q/k RMSNorm,
    rotate-half RoPE at `positions` [B, N], k and v written to the ring-buffer cache
    (slot = position % C). Returns q [B, N, H, D]. kv_mode 1: qkv is [q | k] and v is
    the raw k (K as V); 2: qkv is q alone and nothing is written. v_norm: v is
    RMS-normed without a scale before it is cached."""
    mod = _native if _native is not None else _load()
    if mod and qkv.dtype == torch.float32 and qkv.is_cpu:
        return mod.qkv_rope_cache(qkv, positions, heads, kv_heads, q_norm, k_norm, eps, offset, inv_freq,
                                  k_cache, v_cache, kv_mode, v_norm)
    return reference_qkv_rope_cache(qkv, positions, heads, kv_heads, q_norm, k_norm, eps, offset, inv_freq,
                                    k_cache, v_cache, kv_mode, v_norm)


_no_cache: dict = {}  # (B, D) -> a stand-in cache for norm_rope (kv_mode 2 writes nothing)


def norm_rope(q: torch.Tensor, positions: torch.Tensor, norm_w: torch.Tensor, eps: float, offset: float,
              inv_freq: torch.Tensor) -> torch.Tensor:
    """Per-head RMSNorm, then rotate-half RoPE, of queries q [B, N, H, D] (fp32): one native call
    (qkv_rope_cache with nothing cached) instead of ~15 torch ops."""
    B, N, H, D = q.shape
    mod = _native if _native is not None else _load()
    if mod and q.dtype == torch.float32 and q.is_cpu:
        stand_in = _no_cache.get((B, D))
        if stand_in is None:
            stand_in = _no_cache[B, D] = torch.empty(B, 1, 1, D)
        return mod.qkv_rope_cache(q.reshape(B, N, H * D), positions, H, 1, norm_w, None, eps, offset, inv_freq,
                                  stand_in, stand_in, 2, False)
    return apply_rope(reference_rmsnorm(q, norm_w, eps, offset), positions, inv_freq)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap) (in place where native): each element's bits are independent
    of the row count and thread count by construction (torch.tanh chunks by element
    count and threads and promises nothing about it)."""
    mod = _native if _native is not None else _load()
    if mod and x.dtype == torch.float32 and x.is_cpu and x.is_contiguous() and not x.requires_grad:
        mod.softcap_(x, cap)
        return x
    return reference_softcap(x, cap)


# ---------------------------------------------------------------------------
# quantized weights (GGUF block types; mtpdraft_qkernels.cpp, layouts in quant.py)
# ---------------------------------------------------------------------------
_QSRC = Path(__file__).with_name("mtpdraft_qkernels.cpp")
_AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"]
_qnative: dict = {}  # isa -> module, or False once loading failed
_qfail: dict = {}


def quant_isa() -> str:
    """The instruction set the quantized kernels use here: avx512-vnni where the CPU has
    it (checked at run time), else avx2; MTPDRAFT_QUANT_ISA=avx2 forces the AVX2 build."""
    forced = os.environ.get("MTPDRAFT_QUANT_ISA", "")
    if forced:
        if forced not in ("avx2", "avx512-vnni"):
            raise ValueError(f"MTPDRAFT_QUANT_ISA must be avx2 or avx512-vnni, got {forced!r}")
        return forced
    flags = _cpu_flags()
    return "avx512-vnni" if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= flags else "avx2"


def _qload(isa: str | None = None):
    mod = _qnative.get(isa or "default")
    if mod is not None:
        return mod
    isa = isa or quant_isa()
    with _lock:
        if isa in _qnative:
            return _qnative[isa]
        try:
            _check_native_allowed()
            flags = _CFLAGS + (_AVX512_FLAGS if isa == "avx512-vnni" else [])
            _qnative[isa] = _build(_QSRC, "mtpdraft_qkernels_" + isa.replace("-", "_") + "_", flags)
        except Exception as e:  # noqa: BLE001
            _qnative[isa] = False
            _qfail[isa] = f"{type(e).__name__}: {e}".splitlines()[0]
            warnings.warn(f"mtpdraft: native quantized kernels unavailable ({_qfail[isa]}); quantized weights "
                          "run through dequantizing torch ops -- slow, and batch invariance is NOT guaranteed.",
                          RuntimeWarning, stacklevel=3)
        if isa == quant_isa():  # later calls without an isa skip the CPU check
            _qnative["default"] = _qnative[isa]
    return _qnative[isa]


def require_native(what: str = "speculative decoding") -> None:
    """Raise a clear error if the batch-invariant kernels cannot be used: without them a
    k-token verification may round differently from one-token decoding."""
    if not _load():
        raise RuntimeError(f"{what} needs mtpdraft's native CPU kernels, which could not be loaded "
                           f"({_fail_reason.splitlines()[0] if _fail_reason else 'unknown reason'}); "
                           "use --drafter none for plain decoding")
    if _qnative.get("default") is False:
        raise RuntimeError(f"{what} needs mtpdraft's native quantized kernels, which could not be loaded "
                           f"({'; '.join(_qfail.values())}); use --drafter none, or --dtype bf16")


class QWeight:
    """A [O, K] weight held as quantized panels of 16 rows (quant.py), possibly several parts (row blocks of
    different types, e.g. a fused q/k/v projection). Never dequantized as a whole for
    inference; `rows()` gives exact fp32 values of selected rows (embedding lookups)."""

    __slots__ = ("parts", "types", "shape", "_ids")

    def __init__(self, parts: list[torch.Tensor], types: list[str], k: int):
        from .quant import PANEL, QTYPES, UNIT, panel_bytes

        for p, t in zip(parts, types):
            if p.dtype != torch.uint8 or p.dim() != 2 or k % UNIT[t][0] or p.shape[1] != panel_bytes(t, k):
                raise ValueError(f"malformed {t} weight: {tuple(p.shape)} {p.dtype} for K={k}")
        self.parts, self.types = parts, list(types)
        self.shape = torch.Size([sum(p.shape[0] for p in parts) * PANEL, k])
        self._ids = [QTYPES[t] for t in types]

    @staticmethod
    def q8_0(w: torch.Tensor) -> "QWeight":
        """A dense [O, K] weight quantized to Q8_0 (quant.quantize_q8_0), as one part."""
        from .quant import quantize_q8_0

        return QWeight([torch.from_numpy(quantize_q8_0(w))], ["Q8_0"], w.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(p.numel() for p in self.parts)

    @staticmethod
    def cat(ws: "list[QWeight]") -> "QWeight":
        """Row concatenation; adjacent parts of one type are merged into one tensor."""
        parts, types = [], []
        for w in ws:
            for p, t in zip(w.parts, w.types):
                if types and types[-1] == t:
                    parts[-1].append(p)
                else:
                    parts.append([p])
                    types.append(t)
        return QWeight([_joined(ps) for ps in parts], types, ws[0].shape[1])

    def stack_mat(self) -> "tuple[list[torch.Tensor], list[int]]":
        """(parts, type ids): how layer_stack takes a matrix."""
        return list(self.parts), list(self._ids)

    def to_huge_pages(self) -> "QWeight":
        mod = _qload()
        if mod:
            self.parts = [mod.huge_copy(p) for p in self.parts]
        return self

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 values of rows `ids` (any shape) -> [*ids.shape, K]."""
        flat = ids.reshape(-1).long()
        if len(self.parts) != 1:
            return self.dequantize()[flat].reshape(*ids.shape, self.shape[1])
        mod = _qload()
        if mod:
            out = mod.qrows(self.parts[0], self._ids[0], self.shape[1], flat)
        else:
            from .quant import dequantize

            out = torch.from_numpy(dequantize(self.parts[0].numpy(), self.types[0], self.shape[1]))[flat]
        return out.reshape(*ids.shape, self.shape[1])

    def dequantize(self) -> torch.Tensor:
        """The whole weight in fp32 (for training and tests, never for decoding)."""
        from .quant import dequantize

        return torch.cat([torch.from_numpy(dequantize(p.numpy(), t, self.shape[1])) for p, t in zip(self.parts, self.types)])


def _joined(ps: list[torch.Tensor]) -> torch.Tensor:
    """Row concatenation of panel tensors: a view when they lie back to back in one buffer
    (an arena), so a fused weight and its projections share memory; else a copy."""
    if len(ps) == 1:
        return ps[0]
    a = ps[0]
    if all(q.untyped_storage().data_ptr() == a.untyped_storage().data_ptr() and q.shape[1] == a.shape[1]
           and q.is_contiguous() and p.data_ptr() + p.numel() == q.data_ptr() for p, q in zip(ps, ps[1:])):
        rows = sum(q.shape[0] for q in ps)
        return torch.empty(0, dtype=torch.uint8).set_(a.untyped_storage(), a.storage_offset(), (rows, a.shape[1]))
    return torch.cat(ps)


def arena(ws: "list[QWeight]") -> None:
    """Move the weights' panels into one buffer in transparent huge pages, back to back in
    the given order (the order a forward reads them): one stream per step instead of many
    small ones, and row concatenations of neighbours (fused projections) become views.
    Each weight keeps its bytes; only where they live changes."""
    mod = _qload()
    parts = [p for w in ws for p in w.parts]
    if not mod or not parts:
        return
    buf = mod.huge_empty(sum(p.numel() for p in parts))
    off = 0
    for w in ws:
        new = []
        for p in w.parts:
            v = buf[off:off + p.numel()].view(p.shape)
            v.copy_(p)
            new.append(v)
            off += p.numel()
        w.parts = new


def layer_stack(layers: "list[dict]"):
    """The decoder layers as one native call (mtpdraft_qkernels.Stack): `layers` holds each
    block's StackLayer arguments (its stack_kwargs()). Same kernel calls as the Python blocks,
    so the same bits. None when either kernel module is unavailable."""
    mod, main = _qload(), _load()
    if not mod or not main or not layers:
        return None
    stack = mod.Stack(main.layer_fns())
    for kw in layers:
        stack.add(mod.StackLayer(**kw))
    return stack


def draft_step(embed, embed_scale: float, pre, post, centroids, final_norm, final_eps: float, final_offset: float,
               tie: bool, clusters: torch.Tensor, top_k: int, head, layers: "list[dict]"):
    """An MTP drafting step as one native call (mtpdraft_qkernels.DraftStep): the same kernels
    as MTPDrafter.step in the same order, so the same bits (dense weights packed, whose GEMV
    gives the row-major kernel's bits). Weights: as `linear` takes them (Tensor, Packed, or a
    QWeight for a quantized drafter); embed: a one-part QWeight or a dense table; head: the cluster-ordered
    QWeight (one part a cluster) or a dense output table; each layer's dict holds its
    DraftStepLayer arguments with q, o, gate_up, down as weights. None when either kernel
    module is unavailable or a weight is of a kind it does not take."""
    mod, main = _qload(), _load()
    if not mod or not main:
        return None

    def dense(w):
        if isinstance(w, QWeight):
            return mod.DLin(list(w.parts), list(w._ids), w.shape[0])
        if isinstance(w, Packed) and w.fresh:
            return mod.DLin(w.data, w.shape[0], True)
        w = w.source if isinstance(w, Packed) else w
        if not isinstance(w, torch.Tensor) or w.dtype not in (torch.float32, torch.bfloat16):
            return None
        return mod.DLin(w, w.shape[0], False)

    def quant(w):  # (panel blocks, type id), or a dense table as (one tensor, -1)
        if isinstance(w, QWeight):
            return list(w.parts), w._ids[0] if len(set(w._ids)) == 1 else None
        return [w], -1

    lins = [dense(w) for w in (pre, post, centroids)]
    (emb_parts, emb_type), (head_parts, head_type) = quant(embed), quant(head)
    if None in lins or emb_type is None or head_type is None or len(emb_parts) != 1:
        return None
    step = mod.DraftStep(main.layer_fns(), emb_parts[0], emb_type, float(embed_scale), *lins, final_norm,
                         float(final_eps), float(final_offset), bool(tie), clusters, int(top_k), head_parts, head_type)
    for kw in layers:
        ws = {n: dense(kw[n]) for n in ("q", "o", "gate_up", "down")}
        if None in ws.values():
            return None
        step.add(mod.DraftStepLayer(**{**kw, **ws}))
    return step


def qlinear(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    """y = x @ w.T for a quantized weight: x [..., K] fp32 -> [..., O] fp32, activations
    quantized per row in blocks of 32; each row bit-identical however many share the call."""
    mod = _qload()
    if mod and x.is_cpu:
        return mod.qlinear(x if x.dtype == torch.float32 else x.float(), w.parts, w._ids)
    return F.linear(x.float(), w.dequantize())


def qlinear_parts(x: torch.Tensor, parts: list[torch.Tensor], qtype: str) -> torch.Tensor:
    """qlinear over panel blocks of one type taken as they are (a drafter's selected clusters,
    each a slice of a checked QWeight): no per-call QWeight."""
    mod = _qload()
    if mod and x.is_cpu:
        from .quant import QTYPES

        return mod.qlinear(x if x.dtype == torch.float32 else x.float(), parts, [QTYPES[qtype]] * len(parts))
    return qlinear(x, QWeight(parts, [qtype] * len(parts), x.shape[-1]))


def take_rows(w: "torch.Tensor | QWeight", ids: torch.Tensor) -> torch.Tensor:
    """Rows of a weight (dense or quantized) in fp32: an embedding lookup."""
    if isinstance(w, QWeight):
        return w.rows(ids)
    return F.embedding(ids, w).float()


def dense(w: "torch.Tensor | QWeight | Packed") -> torch.Tensor:
    """A weight as an ordinary tensor (quantized ones dequantized to fp32)."""
    if isinstance(w, QWeight):
        return w.dequantize()
    return w.source if isinstance(w, Packed) else w
