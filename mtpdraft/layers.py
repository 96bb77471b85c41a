"""Building blocks shared by every model family.

Activations are fp32 everywhere; only weights (and the KV cache) take the model
dtype. Linear layers and attention go through `mtpdraft.kernels`, whose results
per row do not depend on how many rows share a forward: that is what makes a
(k+1)-token verification reproduce one-token decoding bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .cache import LayerCache

# Forwards up to this many rows use the batch-invariant kernels; bigger ones
# (long prefills) use the library GEMM, which both decoding modes share.
INVARIANT_MAX_ROWS = 64


class Module(nn.Module):
    """nn.Module called straight through to forward(): a decode step makes ~110 module
    calls, and nn.Module.__call__'s hook dispatch costs a few us each (~0.3 ms a step).
    Hooks are not supported on these modules; autograd is unaffected."""

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


def linear(x: torch.Tensor, w: "torch.Tensor | kernels.Packed | kernels.QWeight") -> torch.Tensor:
    """x: [..., K] fp32, w: [O, K] (or packed, or quantized) -> [..., O] fp32."""
    if x.numel() <= INVARIANT_MAX_ROWS * x.shape[-1] or isinstance(w, kernels.QWeight):
        return kernels.linear(x, w)
    return F.linear(x, (w.source if isinstance(w, kernels.Packed) else w).float())


class Linear(Module):
    """Bias-free linear layer with HF's parameter name (`weight`, [out, in])."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.packed = None  # set by pack(): the same weight in the GEMV's streaming layout
        self.qweight = None  # the weight as quantized blocks (then `weight` is empty)

    def pack(self) -> None:
        self.packed = self.qweight if self.qweight is not None else kernels.pack(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qweight if self.qweight is not None else self.packed
        return linear(x, w if w is not None else self.weight)


def fuse_weights(*layers: Linear) -> "torch.Tensor | kernels.QWeight":
    """Concatenate the layers' weights along the output dim; leave each layer a view.
    Quantized layers are concatenated as quantized row blocks (each keeps its own)."""
    if all(m.qweight is not None for m in layers):
        return kernels.QWeight.cat([m.qweight for m in layers])
    if any(m.qweight is not None for m in layers):
        raise ValueError("cannot fuse quantized and unquantized projections")
    fused = torch.cat([m.weight.data for m in layers])
    start = 0
    for m in layers:
        n = m.weight.shape[0]
        m.weight.data = fused[start:start + n]
        start += n
    return fused


class GatedMLP(Module):
    """down(act(gate(x)) * up(x)), with gate and up fused into one weight by fuse()."""

    def __init__(self, hidden: int, inter: int, act: str):
        super().__init__()
        self.gate_proj, self.up_proj = Linear(hidden, inter), Linear(hidden, inter)
        self.down_proj = Linear(inter, hidden)
        if act not in kernels.ACTS:
            raise ValueError(f"unsupported activation {act!r}")
        self.act = act
        self.gate_up = None

    def fuse(self) -> None:
        self.gate_up = kernels.pack(fuse_weights(self.gate_proj, self.up_proj))
        self.down_proj.pack()

    def stack_kwargs(self) -> dict | None:
        """This MLP's part of a kernels.StackLayer (None unless its weights are quantized)."""
        if not isinstance(self.gate_up, kernels.QWeight) or self.down_proj.qweight is None:
            return None
        return dict(gate_up=self.gate_up.stack_mat(), down=self.down_proj.qweight.stack_mat(), act=kernels.ACTS[self.act])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gu = linear(x, self.gate_up)
        else:
            gu = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)
        return self.down_proj(kernels.gated_act(gu, self.act))


class RMSNorm(Module):
    """RMSNorm in fp32. Gemma stores the scale as an offset from 1 (`offset=1`)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim), requires_grad=False)
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rmsnorm(x.float(), self.weight, self.eps, self.offset)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies as HF computes them (fp32), with linear/llama3 scaling."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(is_mid, mid, scaled)
    elif kind not in ("default", None):
        raise ValueError(f"unsupported rope scaling type: {kind!r}")
    return inv


class Attention(Module):
    """GQA self-attention over the layer's cache; optional per-head q/k norms (Gemma)."""

    def __init__(self, *, hidden: int, heads: int, kv_heads: int, head_dim: int, scale: float,
                 window: int, inv_freq: torch.Tensor, qk_norm_eps: float | None = None,
                 norm_offset: float = 0.0, softcap: float = 0.0):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.scale, self.window, self.softcap = scale, window, softcap
        self.q_proj = Linear(hidden, heads * head_dim)
        self.k_proj = Linear(hidden, kv_heads * head_dim)
        self.v_proj = Linear(hidden, kv_heads * head_dim)
        self.o_proj = Linear(heads * head_dim, hidden)
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps, norm_offset)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps, norm_offset)
        else:
            self.q_norm = self.k_norm = None
        self.inv_freq = inv_freq  # RoPE frequencies, fp32 [head_dim / 2] (may be shared by layers)
        self.qkv = None  # fused [q; k; v] weight, set by fuse()

    def fuse(self) -> None:
        """One weight for q, k and v: one kernel call instead of three. Each output
        element is still its own fixed-order dot product, so results are unchanged;
        the separate weights become views of the fused one. The projections are then
        packed for the streaming GEMV (a second, packed copy of the weights)."""
        self.qkv = kernels.pack(fuse_weights(self.q_proj, self.k_proj, self.v_proj))
        self.o_proj.pack()

    def stack_kwargs(self) -> dict | None:
        """This attention's part of a kernels.StackLayer, with exactly the arguments forward()
        passes (None unless its weights are quantized)."""
        if not isinstance(self.qkv, kernels.QWeight) or self.o_proj.qweight is None:
            return None
        qn, kn = self.q_norm, self.k_norm
        return dict(qkv=self.qkv.stack_mat(), o=self.o_proj.qweight.stack_mat(),
                    q_norm=qn.weight if qn is not None else None, k_norm=kn.weight if kn is not None else None,
                    qk_eps=qn.eps if qn is not None else 0.0, qk_offset=qn.offset if qn is not None else 0.0,
                    inv_freq=self.inv_freq, heads=self.heads, kv_heads=self.kv_heads, window=self.window,
                    scale=self.scale, softcap=self.softcap)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        B, N, _ = x.shape
        if self.qkv is not None:
            qkv = linear(x, self.qkv)
        else:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        # q/k norms, RoPE and the cache write in one native call
        qn, kn = self.q_norm, self.k_norm
        q = kernels.qkv_rope_cache(qkv, positions, self.heads, self.kv_heads,
                                   qn.weight if qn is not None else None, kn.weight if kn is not None else None,
                                   qn.eps if qn is not None else 0.0, qn.offset if qn is not None else 0.0,
                                   self.inv_freq, cache.k, cache.v)
        out = kernels.attention(q, cache.k, cache.v, positions, window=self.window,
                                scale=self.scale, softcap=self.softcap)
        return self.o_proj(out.reshape(B, N, self.heads * self.head_dim))
