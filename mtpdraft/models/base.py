"""What every model family shares: the decoder stack, its cache, weight loading.

A family file defines its `ModelArgs` (parsed from config.json) and its decoder
`Block`; `CausalLM` runs embed -> blocks -> final norm -> head and exposes what a
drafter reads: the scaled input embedding, the last hidden state, and each
layer's cached K/V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..cache import KVCache
from ..layers import Linear, RMSNorm, linear


@dataclass
class ForwardOut:
    logits: torch.Tensor | None  # [B, N or 1, V] fp32
    hidden: torch.Tensor  # [B, N, D] fp32, after the final norm (what the head reads)


class CausalLM(nn.Module):
    """Decoder-only LM. Subclasses build `self.model.layers` and set `embed_scale`."""

    args: "object"
    embed_scale: float = 1.0

    def __init__(self, args, blocks: list[nn.Module]):
        super().__init__()
        self.args = args
        self.model = nn.Module()
        self.model.embed_tokens = nn.Module()
        self.model.embed_tokens.weight = nn.Parameter(
            torch.empty(args.vocab_size, args.hidden_size), requires_grad=False)
        self.model.layers = nn.ModuleList(blocks)
        self.model.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, args.norm_offset)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size)
        self._head = None  # the head weight packed for the streaming GEMV, or quantized (load_weights)
        self._qembed = None  # quantized input embedding (tied head), if the weights are quantized
        self.weights_format = "uninitialized"  # bf16 | fp32 | the quantized types in use (load_weights)
        self.quantized = False  # whether its matrices are quantized blocks (load_weights)
        self.layer_stack = None  # the blocks as one native call (quantized Gemma 3 / Llama; load_weights)

    # -- what the decoding loop and the drafters use -------------------------------
    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def head_weight(self) -> "torch.Tensor | kernels.QWeight":
        """The output table [V, D]: a tensor, or a kernels.QWeight for quantized weights
        (read rows with kernels.take_rows, or all of it with kernels.dense)."""
        if isinstance(self._head, kernels.QWeight):
            return self._head
        return self.model.embed_tokens.weight if self.args.tie_word_embeddings else self.lm_head.weight

    @property
    def embed_table(self) -> "torch.Tensor | kernels.QWeight":
        """The input embedding table [V, D] that embed() reads (before embed_scale)."""
        return self._qembed if self._qembed is not None else self.model.embed_tokens.weight

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Input embeddings [B, N, D] in fp32, scaled as this family scales them."""
        e = kernels.take_rows(self.embed_table, tokens)
        return e * self.embed_scale if self.embed_scale != 1.0 else e

    def per_layer_inputs(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """Families with per-layer input embeddings (Gemma 4 edge) return [B, N, L, P]."""
        return None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden [..., D] -> logits [..., V] fp32."""
        out = linear(hidden, self._head if self._head is not None else self.head_weight)
        cap = self.args.final_logit_softcapping
        return kernels.softcap(out, cap) if cap else out

    def layer_windows(self) -> list[int]:
        return [blk.self_attn.window for blk in self.model.layers]

    def new_cache(self, batch: int = 1, max_len: int | None = None, max_chunk: int = 256) -> KVCache:
        max_len = min(max_len or 8192, self.args.max_position_embeddings)
        return KVCache.allocate(batch=batch, windows=self.layer_windows(),
                                num_kv_heads=self.args.num_key_value_heads, head_dim=self.args.head_dim,
                                max_len=max_len, max_chunk=max_chunk, dtype=self.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, logits: str = "all") -> ForwardOut:
        """Run N new tokens per row ([B, N]) at the end of each row, extending the cache.

        logits: "all" (every position), "last" (only the last) or "none".
        """
        B, N = tokens.shape
        if B != cache.batch:
            raise ValueError(f"tokens have {B} rows, cache has {cache.batch}")
        positions = cache.positions(N)
        x = self.embed(tokens)
        extra = self.per_layer_inputs(tokens, x)
        if self.layer_stack is not None and extra is None:
            x = self.layer_stack.forward(x, positions, [c.k for c in cache.layers], [c.v for c in cache.layers])
        else:
            for i, (blk, layer_cache) in enumerate(zip(self.model.layers, cache.layers)):
                x = blk(x, positions, layer_cache) if extra is None else blk(x, positions, layer_cache, extra[:, :, i])
        h = self.model.norm(x)
        cache.advance(N)
        out = None
        if logits == "all":
            out = self.logits(h)
        elif logits == "last":
            out = self.logits(h[:, -1:])
        return ForwardOut(out, h)

    def prefill(self, tokens: torch.Tensor, cache: KVCache) -> ForwardOut:
        """Prompt forward in chunks of cache.max_chunk; returns the last chunk's output."""
        out = None
        for s in range(0, tokens.shape[1], cache.max_chunk):
            out = self(tokens[:, s:s + cache.max_chunk], cache, logits="last")
        return out

    # -- loading --------------------------------------------------------------------
    def load_weights(self, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                     quant: "dict[str, kernels.QWeight] | None" = None) -> None:
        """Copy HF-named tensors in (missing/unexpected names are an error). `quant` holds
        quantized matrices by the same names: they replace those tensors (the activations
        and the KV cache then use `dtype`)."""
        quant = quant or {}
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(weights) - set(quant))
        unexpected = sorted((set(weights) | set(quant)) - set(params))
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the {type(self).__module__} architecture: "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        for name, p in params.items():
            w = quant[name] if name in quant else weights[name]
            if tuple(w.shape) != tuple(p.shape):
                raise ValueError(f"tensor {name}: checkpoint shape {tuple(w.shape)} != model shape {tuple(p.shape)}")
            if name in quant:
                p.data = torch.empty(0, dtype=dtype)  # the quantized copy is the weight
                continue
            keep_fp32 = p.ndim == 1  # norm scales stay fp32 (tiny, read once)
            p.data = w.to(torch.float32 if keep_fp32 else dtype).contiguous()
        head_name = "model.embed_tokens.weight" if self.args.tie_word_embeddings else "lm_head.weight"
        stream = []  # the layers' quantized matrices in the order a forward reads them
        for name, m in self.named_modules():
            if isinstance(m, Linear) and name + ".weight" in quant:
                m.qweight = quant[name + ".weight"]
                if name + ".weight" != head_name and all(m.qweight is not w for w in stream):
                    stream.append(m.qweight)
        kernels.arena(stream)  # one contiguous stream; fusing neighbours below then copies nothing
        for m in self.modules():  # fused projections: fewer kernel calls per step
            if hasattr(m, "fuse") and m is not self:
                m.fuse()
        if "model.embed_tokens.weight" in quant:
            self._qembed = quant["model.embed_tokens.weight"].to_huge_pages()
        if head_name in quant:
            self._head = quant[head_name]
            if self._head is not self._qembed:
                self._head.to_huge_pages()
        else:
            self._head = kernels.pack(self.head_weight)  # the biggest matrix: stream it
        plans = [blk.stack_kwargs() if hasattr(blk, "stack_kwargs") else None for blk in self.model.layers]
        self.layer_stack = kernels.layer_stack(plans) if plans and all(plans) else None
        types = sorted({t for q in quant.values() for t in q.types})
        dense = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
        self.weights_format = "+".join(types) if types else dense
        self.quantized = bool(types)
        if types and len(quant) < sum(p.ndim == 2 for p in params.values()):
            self.weights_format += f" (+{dense})"  # some matrices stayed dense

    def weight_bytes(self) -> int:
        """Bytes of weights a decode step reads (quantized matrices at their own size)."""
        seen, total = set(), 0
        for m in self.modules():
            q = getattr(m, "qweight", None)
            if q is not None and id(q) not in seen:
                seen.add(id(q))
                total += q.nbytes
        if isinstance(self._head, kernels.QWeight) and id(self._head) not in seen:
            total += self._head.nbytes
        return total + sum(p.numel() * p.element_size() for p in self.parameters())
