"""Official Gemma 4 MTP drafters (`model_type: gemma4_assistant`) as MTPDrafters.

The checkpoint follows the MTPDrafter layout (pre_projection, query-only
model.layers, model.norm, post_projection, model.embed_tokens as the tied head,
masked_embedding.{centroids,token_ordering}); its math differs from the generic
drafter in mtp.py in ways taken from transformers' Gemma4AssistantForCausalLM
and SinglePositionMultiTokenCandidateGenerator (5.10.4):

- norms are Gemma 4's: x * weight (no 1+ offset), and each layer ends with a
  learned `layer_scalar`;
- query heads have the head_dim of the target layer type they read (full layers
  may use a larger global_head_dim than sliding ones);
- the RoPE position of the queries is that of the token being embedded (the
  last committed token t, not yet run through the target), i.e. one past the
  last verified position, while the keys are the target's verified ones
  (positions <= the last verified position; sliding layers see the last W + 1 of
  them, which is what transformers' bidirectional-then-flipped mask gives);
- the input is concat(target.embed(t), h) with h the target's final-normed
  hidden state at the last verified position (the one whose logits chose t), and
  later steps use post_projection(norm(x)): unchanged from mtp.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..kernels import apply_rope
from ..layers import Linear, RMSNorm
from ..models import gemma4, load_safetensors_dir
from ..models.base import CausalLM
from .mtp import MTPConfig, MTPDrafter


class DraftAttention(nn.Module):
    def __init__(self, c: MTPConfig, head_dim: int, window: int = 0):
        super().__init__()
        self.heads, self.head_dim, self.window = c.num_attention_heads, head_dim, window
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * head_dim)
        self.q_norm = RMSNorm(head_dim, c.rms_norm_eps)
        self.o_proj = Linear(c.num_attention_heads * head_dim, c.hidden_size)

    def forward(self, x, positions, src, attend):
        """positions: [B, T], the last verified position; the query sits one past it."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.heads, self.head_dim))
        q = apply_rope(q, positions + 1, src.inv_freq)
        # Keys: the verified positions <= p; a sliding layer sees W + 1 of them (p-W..p),
        # W the assistant's own text_config.sliding_window (normally the target's), as
        # transformers' assistant mask does (measured: W or W-1 keys differ by ~1e-2).
        return self.o_proj(attend(q, self.window).reshape(B, T, -1))


class DraftLayer(nn.Module):
    def __init__(self, c: MTPConfig, layer_type: str, head_dim: int, window: int = 0):
        super().__init__()
        self.layer_type = layer_type
        self.self_attn = DraftAttention(c, head_dim, window if layer_type == "sliding_attention" else 0)
        self.mlp = gemma4.MLP(c.hidden_size, c.intermediate_size)
        norm = lambda: RMSNorm(c.hidden_size, c.rms_norm_eps)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.layer_scalar = nn.Parameter(torch.ones(1), requires_grad=False)

    def forward(self, x, positions, src, attend):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, src, attend))
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x * self.layer_scalar


class Gemma4AssistantDrafter(MTPDrafter):
    """An MTPDrafter with Gemma 4's layers; drafting (step, sources, the clustered
    head) and MTPDraftSource are shared with mtp.py."""

    def __init__(self, config: MTPConfig, text: gemma4.ModelArgs):
        if config.input_embed_scale != 1.0:  # the official layout has no such field: save() would drop it
            raise ValueError(f"cannot express in gemma4_assistant: input_embed_scale {config.input_embed_scale} "
                             f"(the official drafter reads the target's embedding as it is)")
        super().__init__(config)
        self.text = text
        dims = {t: d for t, d in zip(text.layer_types, text.layer_head_dims)}
        self.model.layers = nn.ModuleList(DraftLayer(config, t, dims[t], text.sliding_window + 1)
                                          for t in config.layer_types)
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def check_target(self, target: CausalLM) -> None:
        """Raise before generation if this assistant cannot read `target`'s cache."""
        c, a = self.config, target.args
        if not isinstance(target, gemma4.Model):
            raise ValueError(f"a gemma4_assistant drafter needs a Gemma 4 target, got {type(target).__module__}")
        if c.backbone_hidden_size != a.hidden_size:
            raise ValueError(f"drafter does not match the target: backbone_hidden_size {c.backbone_hidden_size} "
                             f"!= target hidden_size {a.hidden_size}")
        if c.vocab_size != a.vocab_size:
            raise ValueError(f"drafter does not match the target: vocabulary {c.vocab_size} != {a.vocab_size}")
        need = set(c.layer_types) - set(a.layer_types)
        if need:
            raise ValueError(f"drafter reads {sorted(need)} layers, which the target does not have")
        for layer, attn in zip(self.model.layers, self.source_attentions(target)):
            t, mine = layer.layer_type, layer.self_attn
            if mine.head_dim != attn.head_dim:
                raise ValueError(f"drafter does not match the target: {t} head_dim {mine.head_dim} != {attn.head_dim}")
            if mine.heads % attn.kv_heads:
                raise ValueError(f"drafter does not match the target: {mine.heads} query heads do not group over "
                                 f"the target's {attn.kv_heads} {t} KV heads")
            theirs = gemma4.rope_inv_freq(self.text.rope_parameters[t], mine.head_dim)
            if not torch.equal(theirs, attn.inv_freq):
                raise ValueError(f"drafter does not match the target: {t} RoPE parameters differ")
            if t == "sliding_attention" and self.text.sliding_window > attn.window:  # keys the cache may not hold
                raise ValueError(f"drafter does not match the target: sliding window "
                                 f"{self.text.sliding_window} > the target's {attn.window}")

    def save(self, out: str | Path) -> Path:
        """Write the official gemma4_assistant layout (what load_gemma4_assistant reads)."""
        self._require_dense()
        c = self.config
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        cfg = {"model_type": "gemma4_assistant", "architectures": ["Gemma4AssistantForCausalLM"],
               "text_config": _text_config_of(self), "backbone_hidden_size": c.backbone_hidden_size,
               "use_ordered_embeddings": c.use_ordered_embeddings, "num_centroids": c.num_centroids,
               "centroid_intermediate_top_k": c.centroid_intermediate_top_k, "tie_word_embeddings": True,
               "dtype": str(self.model.embed_tokens.weight.dtype).removeprefix("torch.")}
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out


def _text_config_of(d: Gemma4AssistantDrafter) -> dict:
    """Back from the drafter's parsed text args to a 5.10-layout text_config."""
    t, c = d.text, d.config
    dims = dict(zip(t.layer_types, t.layer_head_dims))
    heads = dict(zip(t.layer_types, t.layer_kv_heads))
    hd = dims.get("sliding_attention", t.head_dim)
    kvh = heads.get("sliding_attention", t.num_key_value_heads)
    k_eq_v = bool(t.attention_k_eq_v or heads.get("full_attention", kvh) != kvh)
    n = len(c.layer_types)
    return dict(
        model_type="gemma4_text", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_hidden_layers=n, layer_types=list(c.layer_types),
        num_attention_heads=c.num_attention_heads, num_key_value_heads=kvh, head_dim=hd,
        global_head_dim=dims.get("full_attention", hd), attention_k_eq_v=k_eq_v,
        num_global_key_value_heads=heads.get("full_attention", kvh) if k_eq_v else None,
        sliding_window=t.sliding_window, rope_parameters=t.rope_parameters, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings, hidden_activation="gelu_pytorch_tanh",
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, num_kv_shared_layers=n,
        enable_moe_block=False, use_double_wide_mlp=False, final_logit_softcapping=None, tie_word_embeddings=True)


def is_gemma4_assistant(path: str | Path) -> bool:
    f = Path(path) / "config.json"
    return f.is_file() and json.loads(f.read_text()).get("model_type") == "gemma4_assistant"


def load_gemma4_assistant(path: str | Path, dtype: torch.dtype = torch.float32,
                          target: CausalLM | None = None) -> Gemma4AssistantDrafter:
    """Load an official gemma4_assistant directory (config.json + *.safetensors);
    with `target`, also check that it can draft for it."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a drafter directory (no config.json)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("model_type") != "gemma4_assistant":
        raise ValueError(f"{path}: model_type {cfg.get('model_type')!r} is not gemma4_assistant")
    tc = dict(cfg["text_config"])
    n = tc["num_hidden_layers"]
    if (tc.get("num_kv_shared_layers") or n) != n:  # transformers' assistant config enforces it too
        raise ValueError(f"{path}: every assistant layer must share the target's KV "
                         f"(num_kv_shared_layers {tc.get('num_kv_shared_layers')} != {n})")
    for key in ("hidden_size_per_layer_input", "enable_moe_block", "use_double_wide_mlp"):
        if tc.get(key):
            raise ValueError(f"{path}: gemma4_assistant with {key}={tc[key]} is not supported")
    tc["num_kv_shared_layers"] = 0  # the target holds the K/V; we only need the layer shapes
    text = gemma4.ModelArgs.from_config(tc)
    config = MTPConfig(
        backbone_hidden_size=cfg["backbone_hidden_size"], vocab_size=text.vocab_size, head_dim=text.head_dim,
        num_key_value_heads=1,  # the target's, checked per layer type by check_target
        hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_attention_heads=text.num_attention_heads, layer_types=list(text.layer_types),
        rms_norm_eps=text.rms_norm_eps, use_ordered_embeddings=bool(cfg.get("use_ordered_embeddings", False)),
        num_centroids=cfg.get("num_centroids", 2048),
        centroid_intermediate_top_k=cfg.get("centroid_intermediate_top_k", 32))
    d = Gemma4AssistantDrafter(config, text)
    weights = load_safetensors_dir(path)
    weights.pop("lm_head.weight", None)  # tied to model.embed_tokens
    expected = d.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match gemma4_assistant: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    for k, w in weights.items():
        if w.shape != expected[k].shape:
            raise ValueError(f"{path}: tensor {k} has shape {tuple(w.shape)}, config implies {tuple(expected[k].shape)}")
    if config.use_ordered_embeddings:
        order = weights["masked_embedding.token_ordering"].long()
        if not torch.equal(order.sort().values, torch.arange(config.vocab_size)):
            raise ValueError(f"{path}: masked_embedding.token_ordering is not a permutation of the vocabulary")
        weights["masked_embedding.token_ordering"] = order
    d.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
    d = d.to_dtype(dtype).eval()
    if target is not None:
        d.check_target(target)
    return d


__all__ = ["Gemma4AssistantDrafter", "is_gemma4_assistant", "load_gemma4_assistant"]
