"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral without sliding window)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..cache import LayerCache
from .. import kernels
from ..layers import Attention, GatedMLP, Module, RMSNorm, rope_inv_freq
from .base import CausalLM


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    final_logit_softcapping: float | None = field(default=None, init=False)
    norm_offset: float = field(default=0.0, init=False)

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported llama hidden_act {self.hidden_act!r}")

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        cfg = dict(cfg)
        rope = cfg.get("rope_parameters")
        if rope:  # transformers 5 layout
            cfg["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 10_000.0))
            cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ValueError("llama checkpoints with attention/MLP biases are not supported")
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in cfg.items() if k in names and names[k].init})


class Block(Module):
    def __init__(self, a: ModelArgs, inv_freq: torch.Tensor):
        super().__init__()
        self.self_attn = Attention(
            hidden=a.hidden_size, heads=a.num_attention_heads, kv_heads=a.num_key_value_heads,
            head_dim=a.head_dim, scale=a.head_dim ** -0.5, window=0, inv_freq=inv_freq)
        self.mlp = GatedMLP(a.hidden_size, a.intermediate_size, "silu")
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)

    def stack_kwargs(self) -> dict | None:
        """forward() as one kernels.StackLayer (quantized weights only)."""
        attn, mlp = self.self_attn.stack_kwargs(), self.mlp.stack_kwargs()
        if attn is None or mlp is None:
            return None
        inn, norm = self.input_layernorm, self.post_attention_layernorm
        return dict(attn, **mlp, in_norm=inn.weight, in_eps=inn.eps, in_offset=inn.offset,
                    post_attn=None, pre_mlp=norm.weight, res_eps=norm.eps, res_offset=0.0,
                    post_mlp=None, mlp_eps=0.0, mlp_offset=0.0)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), positions, cache)
        norm = self.post_attention_layernorm
        x, h = kernels.add_rmsnorm(x, a, None, norm.weight, norm.eps)
        return x + self.mlp(h)


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        inv_freq = rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)
        super().__init__(args, [Block(args, inv_freq) for _ in range(args.num_hidden_layers)])


def sanitize(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop rotary caches some checkpoints carry."""
    return {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
