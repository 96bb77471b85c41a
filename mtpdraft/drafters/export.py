"""Export drafters in the official Gemma 4 assistant layout (`model_type: gemma4_assistant`).

`mtpdraft export DRAFTER_DIR --format gemma4-assistant --target TARGET_DIR --out DIR`
writes config.json (text_config in the transformers 5.10 layout: head_dim and
global_head_dim, num_global_key_value_heads) and model.safetensors with the
official tensor names, loadable by transformers' Gemma4AssistantForCausalLM and
by `make_drafter` (which detects the layout).

Two conventions exist (see gemma4_assistant.py for the official one):

- an official-convention drafter (a `Gemma4AssistantDrafter`: made by
  `new_gemma4_assistant`, or loaded from a gemma4_assistant directory) is written
  as it is: its `save()` already writes this layout;
- an mtpdraft MTPDrafter (config.json model_type "mtpdraft_mtp") is converted
  exactly: norm weights + 1 (ours scale by 1 + w, the official ones by w),
  layer_scalar = 1, the sliding window as text_config.sliding_window = W - 1 (the
  official assistant reads W' + 1 keys, ours W), and the query position (official
  queries sit one past the last verified position, ours on it) by folding a
  rotation of -1 position into q_proj. That fold is exact only if each q_norm's
  weights are equal within every rotating RoPE pair (true for untrained norms),
  and the official format forces the last layer to full attention and gives all
  query heads the target's per-layer-type head_dim and its own output table (no
  tie_output_to_target); anything else is refused
  with an error naming the difference. To train a drafter that always exports,
  train a `new_gemma4_assistant(target, ...)` (an MTPDrafter subclass with the
  official math) instead of an MTPDrafter.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models import gemma4
from ..models.base import CausalLM
from .gemma4_assistant import Gemma4AssistantDrafter, is_gemma4_assistant, load_gemma4_assistant
from .mtp import MTPConfig, MTPDrafter

FORMATS = ("gemma4-assistant",)


def _require_gemma4(target: CausalLM) -> gemma4.ModelArgs:
    if not isinstance(target, gemma4.Model):
        name = getattr(target, "name", "") or "the target"
        raise ValueError(f"the gemma4-assistant format needs a Gemma 4 target; {name} is a "
                         f"{type(target).__module__.rsplit('.', 1)[-1]} model")
    return target.args


def _last_of(a: gemma4.ModelArgs, t: str) -> int:
    idx = [i for i, lt in enumerate(a.layer_types) if lt == t]
    if not idx:
        raise ValueError(f"the target has no {t} layer")
    return idx[-1]


def assistant_text_config(target: CausalLM, *, hidden_size: int, intermediate_size: int, num_attention_heads: int,
                          layer_types: list[str], rms_norm_eps: float = 1e-6,
                          sliding_window: int | None = None) -> dict:
    """The gemma4_text config of an assistant for `target` (transformers 5.10 layout):
    query head_dim, KV-head grouping and RoPE per layer type are the target's."""
    a = _require_gemma4(target)
    s, f = _last_of(a, "sliding_attention"), _last_of(a, "full_attention")
    n = len(layer_types)
    k_eq_v = bool(a.attention_k_eq_v or a.layer_kv_heads[f] != a.layer_kv_heads[s])
    return dict(
        model_type="gemma4_text", vocab_size=a.vocab_size, hidden_size=hidden_size,
        intermediate_size=intermediate_size, num_hidden_layers=n, layer_types=list(layer_types),
        num_attention_heads=num_attention_heads, num_key_value_heads=a.layer_kv_heads[s],
        head_dim=a.layer_head_dims[s], global_head_dim=a.layer_head_dims[f], attention_k_eq_v=k_eq_v,
        num_global_key_value_heads=a.layer_kv_heads[f] if k_eq_v else None,
        sliding_window=a.sliding_window if sliding_window is None else sliding_window,
        rope_parameters=a.rope_parameters, rms_norm_eps=rms_norm_eps,
        max_position_embeddings=a.max_position_embeddings, hidden_activation="gelu_pytorch_tanh",
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, num_kv_shared_layers=n,
        enable_moe_block=False, use_double_wide_mlp=False, final_logit_softcapping=None, tie_word_embeddings=True)


def _text_args(tc: dict) -> gemma4.ModelArgs:
    return gemma4.ModelArgs.from_config(dict(tc, num_kv_shared_layers=0))  # as load_gemma4_assistant reads it


def new_gemma4_assistant(target: CausalLM, *, hidden_size: int = 256, intermediate_size: int = 1024,
                         num_attention_heads: int = 4,
                         layer_types: tuple[str, ...] = ("sliding_attention", "full_attention"),
                         use_ordered_embeddings: bool | None = None, num_centroids: int = 2048,
                         centroid_intermediate_top_k: int = 32, rms_norm_eps: float = 1e-6,
                         seed: int = 0, std: float = 0.02) -> Gemma4AssistantDrafter:
    """A random drafter in the official convention for `target` (norms and layer
    scalars 1, as transformers initializes them): train this one to export."""
    if list(layer_types)[-1:] != ["full_attention"]:
        raise ValueError("the gemma4_assistant format needs the last drafter layer to be full_attention")
    a = _require_gemma4(target)
    if use_ordered_embeddings is None:
        use_ordered_embeddings = a.vocab_size % num_centroids == 0
    tc = assistant_text_config(target, hidden_size=hidden_size, intermediate_size=intermediate_size,
                               num_attention_heads=num_attention_heads, layer_types=list(layer_types),
                               rms_norm_eps=rms_norm_eps)
    text = _text_args(tc)
    cfg = MTPConfig(backbone_hidden_size=a.hidden_size, vocab_size=a.vocab_size, head_dim=text.head_dim,
                    num_key_value_heads=1, hidden_size=hidden_size, intermediate_size=intermediate_size,
                    num_attention_heads=num_attention_heads, layer_types=list(text.layer_types),
                    rms_norm_eps=rms_norm_eps, use_ordered_embeddings=use_ordered_embeddings,
                    num_centroids=num_centroids, centroid_intermediate_top_k=centroid_intermediate_top_k)
    d = Gemma4AssistantDrafter(cfg, text)
    g = torch.Generator().manual_seed(seed)
    for _, p in d.named_parameters():
        p.data = torch.ones_like(p) if p.ndim == 1 else torch.randn(p.shape, generator=g) * std
    d.check_target(target)
    return d.eval()


def _fold_query_shift(w: torch.Tensor, heads: int, head_dim: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """q_proj rows rotated by -1 RoPE position (rotate-half pairs i, i + head_dim/2):
    RoPE(p + 1) of the result equals RoPE(p) of the original."""
    half = head_dim // 2
    w64 = w.double().view(heads, 2, half, -1)
    ang = inv_freq.double()[None, :, None]
    cos, sin = torch.cos(ang), torch.sin(ang)
    a, b = w64[:, 0], w64[:, 1]
    return torch.stack([a * cos + b * sin, b * cos - a * sin], 1).reshape(w.shape).to(w.dtype)


def to_gemma4_assistant(d: MTPDrafter, target: CausalLM) -> Gemma4AssistantDrafter:
    """The official-convention drafter that computes what `d` computes for `target`,
    or a ValueError naming the difference the official format cannot express."""
    a = _require_gemma4(target)
    if isinstance(d, Gemma4AssistantDrafter):
        d.check_target(target)
        return d
    c = d.config
    d.check_target(target)  # widths, vocabulary, head_dim, KV heads
    if getattr(c, "tie_output_to_target", False):
        raise ValueError("cannot express in gemma4_assistant: the output head is tied to the target's "
                         "(tie_output_to_target); the official head is the drafter's own model.embed_tokens, "
                         "read in drafter width")
    if c.layer_types[-1] != "full_attention":
        raise ValueError(f"cannot express in gemma4_assistant: the drafter's last layer is {c.layer_types[-1]}, "
                         "the official format forces it to full_attention")
    srcs = d.source_attentions(target)
    for i, (layer, attn) in enumerate(zip(d.model.layers, srcs)):
        if attn.head_dim != c.head_dim:
            raise ValueError(f"drafter does not match the target: its layer {i} ({layer.layer_type}) queries have "
                             f"head_dim {c.head_dim}, the target's {layer.layer_type} keys {attn.head_dim}")
        if c.num_attention_heads % attn.kv_heads:
            raise ValueError(f"drafter does not match the target: {c.num_attention_heads} query heads do not group "
                             f"over the target's {attn.kv_heads} {layer.layer_type} KV heads")
        w, half = layer.self_attn.q_norm.weight.float(), c.head_dim // 2
        rot = attn.inv_freq != 0
        if not torch.equal(w[:half][rot], w[half:][rot]):
            raise ValueError(
                f"cannot express in gemma4_assistant: query RoPE position (mtpdraft drafters place queries at the "
                f"last verified position, the official one past it; folding the shift into q_proj needs layer {i}'s "
                f"q_norm weights equal within each RoPE pair, and they differ). Train a "
                f"mtpdraft.drafters.export.new_gemma4_assistant drafter instead")
    windows = [at.window for at in srcs if at.window]
    if any(t == "sliding_attention" for t in c.layer_types) and a.sliding_window < 2:
        raise ValueError(f"cannot express in gemma4_assistant: sliding window {a.sliding_window} (needs >= 2)")
    # ours read W keys, the official W' + 1: W' = W - 1 gives the same keys
    sliding = a.sliding_window - 1 if windows else a.sliding_window
    tc = assistant_text_config(target, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                               num_attention_heads=c.num_attention_heads, layer_types=list(c.layer_types),
                               rms_norm_eps=c.rms_norm_eps, sliding_window=sliding)
    text = _text_args(tc)
    cfg = MTPConfig(backbone_hidden_size=c.backbone_hidden_size, vocab_size=c.vocab_size, head_dim=text.head_dim,
                    num_key_value_heads=1, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                    num_attention_heads=c.num_attention_heads, layer_types=list(c.layer_types),
                    rms_norm_eps=c.rms_norm_eps, use_ordered_embeddings=c.use_ordered_embeddings,
                    input_embed_scale=c.input_embed_scale,  # refused by Gemma4AssistantDrafter unless 1
                    num_centroids=c.num_centroids, centroid_intermediate_top_k=c.centroid_intermediate_top_k)
    out = Gemma4AssistantDrafter(cfg, text)
    src, sd = d.state_dict(), {}
    for k, v in out.state_dict().items():
        if k.endswith("layer_scalar"):
            sd[k] = torch.ones_like(v)
        elif k.endswith("norm.weight") or k.endswith("layernorm.weight"):
            sd[k] = src[k].float() + 1.0  # ours: x * (1 + w); official: x * w
        else:
            sd[k] = src[k]
    for i, attn in enumerate(srcs):
        k = f"model.layers.{i}.self_attn.q_proj.weight"
        sd[k] = _fold_query_shift(src[k], c.num_attention_heads, c.head_dim, attn.inv_freq)
    out.load_state_dict(sd)
    out.eval()
    out.check_target(target)
    return out


def load_drafter_dir(path: str | Path, target: CausalLM) -> MTPDrafter:
    """Either layout, as the drafter it holds (an official one is checked against `target` here)."""
    path = Path(path)
    if is_gemma4_assistant(path):
        return load_gemma4_assistant(path, torch.float32, target=target)
    return MTPDrafter.load(path, dtype=torch.float32)


def export_drafter(drafter_dir: str | Path, target: CausalLM, out: str | Path, fmt: str = "gemma4-assistant",
                   dtype: torch.dtype = torch.float32) -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; known: {', '.join(FORMATS)}")
    _require_gemma4(target)
    d = to_gemma4_assistant(load_drafter_dir(drafter_dir, target), target)
    if Path(out).resolve() == Path(drafter_dir).resolve():
        raise ValueError("--out must differ from the drafter directory")
    return d.to_dtype(dtype).save(out)


def cmd_export(args) -> int:
    from ..models import load_model_dir

    target = load_model_dir(args.target, "bf16")  # only its shapes, RoPE and windows are read
    out = export_drafter(args.drafter_dir, target, args.out, args.format,
                         torch.float32 if args.dtype == "fp32" else torch.bfloat16)
    print(f"wrote {out} ({args.format}, for target {args.target})")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a drafter in another format (gemma4-assistant: transformers' "
                                      "Gemma4AssistantForCausalLM layout)")
    p.add_argument("drafter_dir", help="drafter directory (mtpdraft MTP drafter or gemma4_assistant)")
    p.add_argument("--format", default="gemma4-assistant", choices=FORMATS)
    p.add_argument("--target", required=True, help="the target model directory the drafter drafts for")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of the written weights")
    p.set_defaults(func=cmd_export)


__all__ = ["assistant_text_config", "export_drafter", "new_gemma4_assistant",
           "to_gemma4_assistant"]
