"""Gemma 3 text decoder (model_type gemma3_text; the text part of gemma3)."""

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
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: list[str]
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    norm_offset: float = field(default=1.0, init=False)

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        cfg = dict(cfg.get("text_config", cfg))
        n = cfg["num_hidden_layers"]
        if "layer_types" not in cfg:  # older configs: every Nth layer is global
            every = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
            cfg["layer_types"] = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]
        rope = cfg.get("rope_parameters")
        if rope:  # transformers 5 layout: one rope dict per layer type
            cfg["rope_theta"] = rope["full_attention"]["rope_theta"]
            cfg["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
            full = rope["full_attention"]
            cfg["rope_scaling"] = full if full.get("rope_type", "default") != "default" else None
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in cfg.items() if k in names and names[k].init})


class Block(Module):
    def __init__(self, a: ModelArgs, i: int, inv_freqs: dict[str, torch.Tensor]):
        super().__init__()
        sliding = a.layer_types[i] == "sliding_attention"
        self.self_attn = Attention(
            hidden=a.hidden_size, heads=a.num_attention_heads, kv_heads=a.num_key_value_heads,
            head_dim=a.head_dim, scale=a.query_pre_attn_scalar ** -0.5,
            window=a.sliding_window if sliding else 0, inv_freq=inv_freqs[a.layer_types[i]],
            qk_norm_eps=a.rms_norm_eps, norm_offset=1.0, softcap=a.attn_logit_softcapping or 0.0)
        self.mlp = GatedMLP(a.hidden_size, a.intermediate_size, "gelu_tanh")
        norm = lambda: RMSNorm(a.hidden_size, a.rms_norm_eps, offset=1.0)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def stack_kwargs(self) -> dict | None:
        """forward() as one kernels.StackLayer (quantized weights only)."""
        attn, mlp = self.self_attn.stack_kwargs(), self.mlp.stack_kwargs()
        if attn is None or mlp is None:
            return None
        inn, post, pre, post_ff = (self.input_layernorm, self.post_attention_layernorm,
                                   self.pre_feedforward_layernorm, self.post_feedforward_layernorm)
        return dict(attn, **mlp, in_norm=inn.weight, in_eps=inn.eps, in_offset=inn.offset,
                    post_attn=post.weight, pre_mlp=pre.weight, res_eps=post.eps, res_offset=post.offset,
                    post_mlp=post_ff.weight, mlp_eps=post_ff.eps, mlp_offset=post_ff.offset)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), positions, cache)
        post, pre = self.post_attention_layernorm, self.pre_feedforward_layernorm
        x, h = kernels.add_rmsnorm(x, a, post.weight, pre.weight, post.eps, post.offset)
        post = self.post_feedforward_layernorm
        return kernels.add_rmsnorm(x, self.mlp(h), post.weight, None, post.eps, post.offset)[0]


class Model(CausalLM):
    def __init__(self, args: ModelArgs):
        # local layers rotate with their own base frequency; global ones may be scaled
        inv_freqs = {"sliding_attention": rope_inv_freq(args.head_dim, args.rope_local_base_freq),
                     "full_attention": rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)}
        super().__init__(args, [Block(args, i, inv_freqs) for i in range(args.num_hidden_layers)])
        # HF keeps the scale in the embedding dtype, so bf16 rounds sqrt(D) first.
        self.embed_scale = float(torch.tensor(args.hidden_size ** 0.5, dtype=torch.float32))

    def load_weights(self, weights, dtype, quant=None):
        super().load_weights(weights, dtype, quant)
        # a quantized embedding is read in exact fp32 (as llama.cpp scales it); dense ones as HF does
        emb_dtype = torch.float32 if self._qembed is not None else dtype
        self.embed_scale = float(torch.tensor(self.args.hidden_size ** 0.5).to(emb_dtype))


def sanitize(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the text decoder of multimodal checkpoints; drop a tied lm_head copy."""
    out = {}
    for k, v in weights.items():
        for prefix in ("language_model.", "model.language_model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                k = k if k.startswith(("model.", "lm_head")) else "model." + k
        if k.startswith(("vision_tower", "multi_modal_projector", "model.vision_tower", "model.multi_modal_projector")):
            continue
        out[k] = v
    return out
