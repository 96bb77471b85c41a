"""Tiny random models for tests: real checkpoint directories that load through
the same path as downloaded ones (config.json + safetensors + tokenizer.json)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .models import build_model

TINY_CONFIGS = {
    "gemma3_text": dict(
        model_type="gemma3_text", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, query_pre_attn_scalar=16,
        sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0),
    "llama": dict(
        model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10_000.0,
        max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=2, eos_token_id=1, pad_token_id=0),
}

# Gemma 4: full layers with their own head_dim (global_head_dim) and proportional RoPE,
# logit softcapping; "edge" adds per-layer inputs (PLE), KV sharing (the last two layers
# read layers 0 and 1), K-as-V full layers and the double-wide MLP of shared layers;
# "moe" adds the mixture-of-experts branch (as gemma4's 26B-A4B).
_GEMMA4 = dict(
    model_type="gemma4_text", vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, rms_norm_eps=1e-6,
    sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                     "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                        "rope_theta": 1_000_000.0}},
    final_logit_softcapping=30.0, hidden_size_per_layer_input=0, vocab_size_per_layer_input=512,
    max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0)
TINY_CONFIGS |= {
    "gemma4_text": _GEMMA4,
    "gemma4_edge": _GEMMA4 | dict(hidden_size_per_layer_input=8, num_kv_shared_layers=2, attention_k_eq_v=True,
                                  num_global_key_value_heads=1, use_double_wide_mlp=True),
    "gemma4_moe": _GEMMA4 | dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                                 attention_k_eq_v=True, num_global_key_value_heads=1),
}


def byte_tokenizer_json(vocab_size: int) -> dict:
    """A byte-level tokenizer: ids 0-3 special, then the 256 bytes; the rest unused."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    for i in range(len(vocab), vocab_size):
        vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return json.loads(tok.to_str())


def tiny_model_dir(out: str | Path, family: str = "gemma3_text", seed: int = 0, **overrides) -> Path:
    """Write a tiny random model of `family` to `out` and return the directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {**TINY_CONFIGS[family], **overrides}
    model = build_model(config)
    g = torch.Generator().manual_seed(seed)
    # Gemma 4's norms, layer_scalar and router scales multiply by the weight itself (no 1+
    # offset as in Gemma 3): center its vectors on 1 so activations keep their scale.
    center = 1.0 if config["model_type"].startswith("gemma4") else 0.0
    weights = {}
    for name, p in model.named_parameters():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        if p.ndim > 1:
            weights[name] = torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5)
        else:
            weights[name] = center + torch.randn(p.shape, generator=g) * 0.1
    if config["model_type"].startswith("gemma"):  # Gemma scales embeddings by sqrt(D): keep logits tame
        weights["model.embed_tokens.weight"] *= config["hidden_size"] ** -0.5
    save_file({k: v.contiguous() for k, v in weights.items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json(config["vocab_size"])))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "unk_token": "<unk>", "pad_token": "<pad>"}))
    return out


def random_gemma4_assistant(text: dict, assistant: dict, seed: int = 0, std: float | None = 0.02,
                            norm_std: float = 0.05):
    """A Gemma4AssistantDrafter with the official layout's shapes and random weights.

    text: the assistant's text_config (transformers' names); assistant: the top-level
    fields (backbone_hidden_size, num_centroids, centroid_intermediate_top_k). Matrices
    draw N(0, std) (None: 1/sqrt(fan-in)), norms and layer scalars 1 + N(0, norm_std)."""
    from .drafters.gemma4_assistant import Gemma4AssistantDrafter
    from .drafters.mtp import MTPConfig
    from .models import gemma4

    args = gemma4.ModelArgs.from_config(text)
    cfg = MTPConfig(backbone_hidden_size=assistant["backbone_hidden_size"], vocab_size=args.vocab_size,
                    head_dim=args.head_dim, num_key_value_heads=1, hidden_size=args.hidden_size,
                    intermediate_size=args.intermediate_size, num_attention_heads=args.num_attention_heads,
                    layer_types=list(args.layer_types),
                    use_ordered_embeddings=assistant.get("use_ordered_embeddings", True),
                    num_centroids=assistant.get("num_centroids", 2048),
                    centroid_intermediate_top_k=assistant.get("centroid_intermediate_top_k", 32))
    d = Gemma4AssistantDrafter(cfg, args)
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v.shape, generator=g) * (norm_std if v.ndim == 1 else std or v.shape[-1] ** -0.5)
          + (v.ndim == 1) for k, v in d.state_dict().items() if v.is_floating_point()}
    if cfg.use_ordered_embeddings:
        sd["masked_embedding.token_ordering"] = torch.randperm(cfg.vocab_size, generator=g)
    d.load_state_dict(sd)
    return d.eval()


def gemma4_assistant_dir(out: str | Path, text: dict, assistant: dict, **kw) -> Path:
    """random_gemma4_assistant written as an official gemma4_assistant directory."""
    d = random_gemma4_assistant(text, assistant, **kw)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in d.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"model_type": "gemma4_assistant", "text_config": text, **assistant}))
    return out
