"""Distinct experts a verification forward touches, by draft length and batch size.

A tiny random Gemma 4 MoE target (mtpdraft.models.gemma4) with the 26B-A4B routing
shape (128 experts, top-8). Each verification forward runs B rows x (k + 1)
tokens (the last committed token plus k drafted ones); we count the distinct
experts its router picks in each MoE layer, averaged over layers and trials.
Random routers spread tokens more evenly than trained ones, so these numbers are
an upper bound on what a real model wakes.

    python benchmarks/moe_experts.py [--experts 128 --top-k 8 --trials 4]
"""

from __future__ import annotations

import argparse

import torch

from mtpdraft.models import build_model
from mtpdraft.models import gemma4


def tiny_moe(experts: int, top_k: int, seed: int = 0) -> gemma4.Model:
    cfg = dict(model_type="gemma4_text", vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
               layer_types=["sliding_attention"] * 3 + ["full_attention"], num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=16,
               enable_moe_block=True, num_experts=experts, top_k_experts=top_k, moe_intermediate_size=8,
               attention_k_eq_v=True, num_global_key_value_heads=1, final_logit_softcapping=30.0)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            p.data = 1 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            p.data = torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
    model.model.embed_tokens.weight.data *= cfg["hidden_size"] ** -0.5
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--max-draft", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = tiny_moe(args.experts, args.top_k)
    seen: list[torch.Tensor] = []
    for blk in model.model.layers:
        router = blk.router
        fwd = router.forward

        def hook(x, fwd=fwd):
            w, idx = fwd(x)
            seen.append(idx)
            return w, idx

        router.forward = hook
    g = torch.Generator().manual_seed(1)
    table = {}
    for b in range(1, args.max_batch + 1):
        for k in range(0, args.max_draft + 1):
            counts = []
            for _ in range(args.trials):
                cache = model.new_cache(b, 64)
                model.prefill(torch.randint(4, 512, (b, 16), generator=g), cache)
                seen.clear()
                model(torch.randint(4, 512, (b, k + 1), generator=g), cache, logits="last")
                counts += [len(torch.unique(idx)) for idx in seen]
            table[b, k] = sum(counts) / len(counts)
    print(f"Distinct experts per MoE layer in one verification forward ({args.experts} experts, top-{args.top_k}; "
          f"B rows x (k+1) tokens; mean of {args.trials} random inputs)\n")
    print("| batch \\ draft k | 0 (plain) | " + " | ".join(str(k) for k in range(1, args.max_draft + 1)) + " |")
    print("|---|" + "---|" * (args.max_draft + 1))
    for b in range(1, args.max_batch + 1):
        cells = " | ".join(f"{table[b, k]:.1f}" for k in range(0, args.max_draft + 1))
        print(f"| {b} | {cells} |")


if __name__ == "__main__":
    main()
