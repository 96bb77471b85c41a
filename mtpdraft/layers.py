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


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x: [..., K] fp32, w: [O, K] -> [..., O] fp32."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] <= INVARIANT_MAX_ROWS:
        y = kernels.linear(x2.contiguous(), w)
    else:
        y = F.linear(x2, w.float())
    return y.reshape(*lead, w.shape[0])


class Linear(nn.Module):
    """Bias-free linear layer with HF's parameter name (`weight`, [out, in])."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class RMSNorm(nn.Module):
    """RMSNorm in fp32. Gemma stores the scale as an offset from 1 (`offset=1`)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim), requires_grad=False)
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * (self.offset + self.weight.float())


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


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x: [B, N, H, D]; positions: [B, N]. Rotate-half convention (HF)."""
    freqs = positions.unsqueeze(-1).float() * inv_freq  # [B, N, D/2]
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(2)  # [B, N, 1, D]
    cos, sin = emb.cos(), emb.sin()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
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
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.heads, self.head_dim)
        k = self.k_proj(x).view(B, N, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, N, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions, self.inv_freq)
        k = apply_rope(k, positions, self.inv_freq)
        cache.write(k, v, positions)
        out = kernels.attention(q, cache.k, cache.v, positions, window=self.window,
                                scale=self.scale, softcap=self.softcap)
        return self.o_proj(out.reshape(B, N, self.heads * self.head_dim))
