"""Gemma 4 text decoder (model_type gemma4_text; the text part of gemma4).

Beyond Gemma 3: norms scale by `weight` (no 1+ offset), V is RMS-normed without a
scale, attention uses scale 1 (q/k norms do the work), full-attention layers may
have their own head_dim / KV heads (and then K doubles as V), full layers use
"proportional" RoPE (only a fraction of the frequencies rotate), every layer ends
with a learned `layer_scalar`. Edge models (E2B/E4B) add per-layer input
embeddings (PLE) and let the last layers reuse an earlier layer's K/V; the
26B-A4B model adds a mixture-of-experts branch beside the dense MLP.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVCache, LayerCache
from .. import kernels
from ..kernels import attention
from ..layers import GatedMLP, Linear, Module, RMSNorm, fuse_weights, linear
from .base import CausalLM


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # sliding layers' (and every layer's unless overridden below)
    layer_types: list[str]
    sliding_window: int = 512
    rms_norm_eps: float = 1e-6
    rope_parameters: dict | None = None
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    final_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 0
    enable_moe_block: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    eos_token_id: int | list[int] | None = None
    # resolved per layer by from_config (config.json has two layouts for them)
    layer_head_dims: list[int] = field(default_factory=list)
    layer_kv_heads: list[int] = field(default_factory=list)
    norm_offset: float = field(default=0.0, init=False)

    def __post_init__(self):
        n = self.num_hidden_layers
        if len(self.layer_types) != n:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {n} layers")
        self.layer_head_dims = self.layer_head_dims or [self.head_dim] * n
        self.layer_kv_heads = self.layer_kv_heads or [self.num_key_value_heads] * n
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"unsupported gemma4 hidden_activation {self.hidden_activation!r}")
        if self.rope_parameters is None:  # transformers' defaults
            self.rope_parameters = {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                   "rope_theta": 1_000_000.0}}
        if self.enable_moe_block and not (self.num_experts and self.top_k_experts and self.moe_intermediate_size):
            raise ValueError("enable_moe_block needs num_experts, top_k_experts and moe_intermediate_size")

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        if "text_config" in cfg:  # the multimodal gemma4 checkpoint: its text decoder only
            if cfg.get("vision_config") or cfg.get("audio_config"):
                warnings.warn("gemma4: loading the text decoder only; image, video and audio inputs are not "
                              "supported (their encoders are skipped)", stacklevel=3)
            cfg = cfg["text_config"]
        cfg = dict(cfg)
        n = cfg["num_hidden_layers"]
        if cfg.get("attention_bias"):
            raise ValueError("gemma4 checkpoints with attention biases are not supported")
        if cfg.get("use_bidirectional_attention") == "all":
            raise ValueError("gemma4 with use_bidirectional_attention='all' is not a causal LM")
        if "layer_types" not in cfg or cfg["layer_types"] is None:
            cfg["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
        cfg["layer_types"] = list(cfg["layer_types"])
        cfg["layer_types"][-1] = "full_attention"  # transformers forces this too
        # Full layers' head_dim / KV heads: transformers <= 5.1x writes global_head_dim and
        # num_global_key_value_heads (KV heads only replaced when K doubles as V); later
        # versions write the resolved values as per_layer_config {layer index: overrides}.
        hd, kvh = cfg["head_dim"], cfg["num_key_value_heads"]
        dims, heads = [hd] * n, [kvh] * n
        plc = cfg.get("per_layer_config")
        for i, t in enumerate(cfg["layer_types"]):
            if t != "full_attention":
                continue
            if plc is not None:
                over = plc.get(str(i), plc.get(i, {})) or {}
                dims[i] = over.get("head_dim") or hd
                heads[i] = over.get("num_key_value_heads") or kvh
            else:
                dims[i] = cfg.get("global_head_dim", 512) or hd
                if cfg.get("attention_k_eq_v"):
                    heads[i] = cfg.get("num_global_key_value_heads") or kvh
        cfg["layer_head_dims"], cfg["layer_kv_heads"] = dims, heads
        cfg["hidden_size_per_layer_input"] = cfg.get("hidden_size_per_layer_input") or 0
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in cfg.items() if k in names and names[k].init})

    def kv_source(self, i: int) -> int | None:
        """The earlier layer whose K/V layer i reuses (None: it computes its own)."""
        first_shared = self.num_hidden_layers - (self.num_kv_shared_layers or 0)
        if i < first_shared:
            return None
        for j in range(first_shared - 1, -1, -1):
            if self.layer_types[j] == self.layer_types[i]:
                return j
        raise ValueError(f"KV-shared layer {i} ({self.layer_types[i]}) has no earlier layer of its type to read")


def rope_inv_freq(params: dict, head_dim: int) -> torch.Tensor:
    """Gemma 4's RoPE: default, or proportional (the first partial_rotary_factor of
    the frequencies rotate, the rest are 0 = no rotation), as transformers builds them."""
    kind = params.get("rope_type", "default")
    base, factor = params["rope_theta"], params.get("factor", 1.0)
    if kind == "default":
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if kind != "proportional":
        raise ValueError(f"unsupported gemma4 rope type {kind!r}")
    angles = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
    inv = 1.0 / (base ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim))
    inv = torch.cat([inv, torch.zeros(head_dim // 2 - angles)])
    return inv / factor


def gelu_gated(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu(gate) * up for gate_up = [gate | up] on the last dim, through the native
    kernel: its bits per row do not depend on the row count. (torch's gelu does not:
    its vectorized body and scalar tail round differently, so a row's result can
    change with how many rows share the call unless the width is a multiple of 32.)"""
    return kernels.gated_act(gate_up, "gelu_tanh")


class Attention(Module):
    """Gemma 4 attention. A KV-shared layer has no K/V projections: its cache entry is
    the source layer's LayerCache object, which it reads without writing."""

    def __init__(self, a: ModelArgs, i: int):
        super().__init__()
        t = a.layer_types[i]
        self.heads, self.head_dim, self.kv_heads = a.num_attention_heads, a.layer_head_dims[i], a.layer_kv_heads[i]
        self.window = a.sliding_window if t == "sliding_attention" else 0
        self.scale, self.eps = 1.0, a.rms_norm_eps  # q_norm/k_norm replace 1/sqrt(d)
        self.kv_source = a.kv_source(i)
        self.k_eq_v = a.attention_k_eq_v and t == "full_attention"
        if self.heads % self.kv_heads:
            raise ValueError(f"layer {i}: {self.heads} query heads do not group over {self.kv_heads} KV heads")
        self.q_proj = Linear(a.hidden_size, self.heads * self.head_dim)
        self.q_norm = RMSNorm(self.head_dim, a.rms_norm_eps)
        self.o_proj = Linear(self.heads * self.head_dim, a.hidden_size)
        if self.kv_source is None:
            self.k_proj = Linear(a.hidden_size, self.kv_heads * self.head_dim)
            if not self.k_eq_v:
                self.v_proj = Linear(a.hidden_size, self.kv_heads * self.head_dim)
            self.k_norm = RMSNorm(self.head_dim, a.rms_norm_eps)
        # what the projection holds, for the native q/k/v step: 0 q|k|v, 1 q|k (K as V), 2 q only
        self.kv_mode = 2 if self.kv_source is not None else 1 if self.k_eq_v else 0
        self.register_buffer("inv_freq", rope_inv_freq(a.rope_parameters[t], self.head_dim), persistent=False)
        self.qkv = None  # the fused projection, set by fuse()

    def projections(self) -> list[Linear]:
        if self.kv_mode == 2:
            return [self.q_proj]
        return [self.q_proj, self.k_proj] + ([self.v_proj] if self.kv_mode == 0 else [])

    def fuse(self) -> None:
        """One (packed) weight for the layer's projections, as the shared Attention does."""
        parts = self.projections()
        if len(parts) > 1:
            self.qkv = kernels.pack(fuse_weights(*parts))
        else:  # a KV-shared layer: q alone
            self.q_proj.pack()
        self.o_proj.pack()

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        B, N, _ = x.shape
        if self.qkv is not None:
            qkv = linear(x, self.qkv)
        else:
            qkv = torch.cat([m(x) for m in self.projections()], dim=-1)
        # q/k norms, RoPE, V's unscaled norm and the cache write in one native call, per
        # row (torch's cos/sin would round by chunk, so by row count and threads)
        kn = self.k_norm.weight if self.kv_mode != 2 else None
        q = kernels.qkv_rope_cache(qkv, positions, self.heads, self.kv_heads, self.q_norm.weight, kn, self.eps,
                                   0.0, self.inv_freq, cache.k, cache.v, self.kv_mode, True)
        out = attention(q, cache.k, cache.v, positions, window=self.window, scale=self.scale)
        return self.o_proj(out.reshape(B, N, self.heads * self.head_dim))


class MLP(GatedMLP):
    """down(gelu(gate(x)) * up(x)), gate and up fused at load as in Gemma 3."""

    def __init__(self, hidden: int, inter: int):
        super().__init__(hidden, inter, "gelu_tanh")


class Router(Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.eps, self.top_k, self.root = a.rms_norm_eps, a.top_k_experts, a.hidden_size ** -0.5
        self.proj = Linear(a.hidden_size, a.num_experts)
        self.scale = nn.Parameter(torch.ones(a.hidden_size), requires_grad=False)
        self.per_expert_scale = nn.Parameter(torch.ones(a.num_experts), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, D] -> (weights [T, k], expert ids [T, k])."""
        # norm(x) * scale: the row-wise native RMSNorm (the unscaled norm times `scale`)
        probs = torch.softmax(self.proj(kernels.rmsnorm(x, self.scale, self.eps) * self.root), dim=-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        return w * self.per_expert_scale[idx], idx


class Experts(Module):
    """Expert weights as 3-D tensors, as the checkpoint stores them."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        E, D, I = a.num_experts, a.hidden_size, a.moe_intermediate_size  # noqa: E741
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(E, D, I), requires_grad=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # Experts run in ascending id order, each over its rows with the row-invariant
        # kernels, so a token's sum has the same order whatever else is in the batch.
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            rows, slot = torch.where(idx == e)
            y = linear(gelu_gated(linear(x[rows], self.gate_up_proj[e])), self.down_proj[e]) * w[rows, slot, None]
            # a token picks an expert at most once, so `rows` has no repeats: the same sums as
            # index_add_, without its parallel region (tens of ms on a busy CPU for a few rows)
            out[rows] += y
        return out


class Block(Module):
    def __init__(self, a: ModelArgs, i: int):
        super().__init__()
        self.self_attn = Attention(a, i)
        wide = a.use_double_wide_mlp and self.self_attn.kv_source is not None
        self.mlp = MLP(a.hidden_size, a.intermediate_size * (2 if wide else 1))
        norm = lambda d=a.hidden_size: RMSNorm(d, a.rms_norm_eps)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.layer_scalar = nn.Parameter(torch.ones(1), requires_grad=False)
        self.ple = a.hidden_size_per_layer_input
        if self.ple:
            self.per_layer_input_gate = Linear(a.hidden_size, self.ple)
            self.per_layer_projection = Linear(self.ple, a.hidden_size)
            self.post_per_layer_input_norm = norm()
        self.moe = a.enable_moe_block
        if self.moe:
            self.router, self.experts = Router(a), Experts(a)
            self.post_feedforward_layernorm_1 = norm()
            self.pre_feedforward_layernorm_2 = norm()
            self.post_feedforward_layernorm_2 = norm()

    def fuse(self) -> None:  # attention and MLP fuse themselves; the PLE projections stream packed
        if self.ple:
            self.per_layer_input_gate.pack()
            self.per_layer_projection.pack()

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache,
                per_layer_input: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, cache))
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.moe:  # the experts read the same residual as the dense MLP
            flat = x.reshape(-1, x.shape[-1])
            w, idx = self.router(flat)
            m = self.experts(self.pre_feedforward_layernorm_2(flat), w, idx).view_as(x)
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(m)
        x = x + self.post_feedforward_layernorm(h)
        if self.ple:
            g = gelu_gated(torch.cat([self.per_layer_input_gate(x), per_layer_input], dim=-1))
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return x * self.layer_scalar


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        super().__init__(args, [Block(args, i) for i in range(args.num_hidden_layers)])
        self.embed_scale = float(torch.tensor(args.hidden_size ** 0.5, dtype=torch.float32))
        P = args.hidden_size_per_layer_input
        if P:
            self.model.embed_tokens_per_layer = nn.Module()
            self.model.embed_tokens_per_layer.weight = nn.Parameter(
                torch.empty(args.vocab_size_per_layer_input, args.num_hidden_layers * P), requires_grad=False)
            self.model.per_layer_model_projection = Linear(args.hidden_size, args.num_hidden_layers * P)
            self.model.per_layer_projection_norm = RMSNorm(P, args.rms_norm_eps)
            self.ple_scale = float(torch.tensor(P ** 0.5, dtype=torch.float32))

    def load_weights(self, weights, dtype, quant=None):
        super().load_weights(weights, dtype, quant)
        # HF keeps the scales in the embedding dtype, so bf16 rounds sqrt(D) first.
        self.embed_scale = float(torch.tensor(self.args.hidden_size ** 0.5).to(dtype))
        if self.args.hidden_size_per_layer_input:
            self.ple_scale = float(torch.tensor(self.args.hidden_size_per_layer_input ** 0.5).to(dtype))
            self.model.per_layer_model_projection.pack()

    def per_layer_inputs(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """PLE: [B, N, L, P] = (norm(proj(x) / sqrt(D)) + ple_table[token] * sqrt(P)) / sqrt(2)."""
        if not self.args.hidden_size_per_layer_input:
            return None
        a, (B, N) = self.args, tokens.shape
        L, P = a.num_hidden_layers, a.hidden_size_per_layer_input
        if int(tokens.max()) >= a.vocab_size_per_layer_input:
            raise ValueError(f"token id {int(tokens.max())} is outside the per-layer embedding table "
                             f"({a.vocab_size_per_layer_input})")
        tok = F.embedding(tokens, self.model.embed_tokens_per_layer.weight).float() * self.ple_scale
        proj = self.model.per_layer_model_projection(x) * a.hidden_size ** -0.5
        proj = self.model.per_layer_projection_norm(proj.view(B, N, L, P))
        return (proj + tok.view(B, N, L, P)) * 2.0 ** -0.5

    def new_cache(self, batch: int = 1, max_len: int | None = None, max_chunk: int = 256) -> KVCache:
        # Per-layer shapes (full layers may have another head_dim / KV heads); a KV-shared
        # layer gets the very LayerCache of its source, so it reads what the source wrote.
        ats = [blk.self_attn for blk in self.model.layers]
        return KVCache.allocate(batch=batch, windows=[at.window for at in ats],
                                num_kv_heads=[at.kv_heads for at in ats], head_dim=[at.head_dim for at in ats],
                                max_len=min(max_len or 8192, self.args.max_position_embeddings),
                                max_chunk=max_chunk, dtype=self.dtype, shared=[at.kv_source for at in ats])


_MULTIMODAL = ("vision_tower", "audio_tower", "embed_vision", "embed_audio", "multi_modal_projector")


def sanitize(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the text decoder of multimodal checkpoints; drop encoders and a tied lm_head copy."""
    out = {}
    for k, v in weights.items():
        if k.startswith(_MULTIMODAL) or k.startswith(tuple("model." + p for p in _MULTIMODAL)):
            continue
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        out[k] = v
    return out
