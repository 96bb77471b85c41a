"""The multi-token-prediction drafter, coupled to its target as Gemma 4's are.

One drafting step reads the last token t and a target-width vector h:
  x = pre_projection([target.embed(t), h])        # shared input embeddings
  x = layers(x)   # queries only; K/V are the target's cached ones (last full /
                  # last sliding layer), at the constant position of the last
                  # verified token, so the drafter has no cache of its own
  h' = post_projection(norm(x))                   # fed to the next step
  logits = head(norm(x))    # dense, or clustered: score C clusters, keep top-k_c,
                            # compute logits only for their tokens
Names and shapes follow the gemma4_assistant checkpoint layout.
"""

from __future__ import annotations

import functools
import json
import math
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .. import kernels
from ..kernels import apply_rope, reference_rmsnorm
from ..kernels.quant import PANEL, permute_rows, supported
from ..decoding.verify import argmax, sample, target_probs
from ..layers import Linear, RMSNorm, linear
from ..models.base import CausalLM
from .base import Draft, DraftContext


@dataclass
class MTPConfig:
    backbone_hidden_size: int  # D, the target's width
    vocab_size: int
    head_dim: int  # the target's head_dim (queries meet the target's keys)
    num_key_value_heads: int  # the target's
    hidden_size: int = 256  # d, the drafter's width
    intermediate_size: int = 1024
    num_attention_heads: int = 4
    layer_types: list[str] = field(default_factory=lambda: ["full_attention"])
    rms_norm_eps: float = 1e-6
    use_ordered_embeddings: bool = True  # the clustered head
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    # True: no output table of its own; the head is the target's (head_weight, V x D), read
    # by h' (the post-projected state, width D), and so are the centroids (C x D)
    tie_output_to_target: bool = False
    # multiplies the target's input embedding before pre_projection (a power of two, so the
    # product is exact in any order): Llama-family embeddings are ~20x smaller than their
    # normed hidden state (RMS ~0.1 vs ~2 in SmolLM2), Gemma's are scaled to ~1
    input_embed_scale: float = 1.0
    model_type: str = "mtpdraft_mtp"

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of the target's num_key_value_heads")
        bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
        if bad:
            raise ValueError(f"unknown layer types {bad}")
        if self.use_ordered_embeddings and self.vocab_size % self.num_centroids:
            raise ValueError(f"vocab_size {self.vocab_size} is not a multiple of num_centroids {self.num_centroids}")
        if not (self.input_embed_scale > 0 and math.frexp(self.input_embed_scale)[0] == 0.5):
            raise ValueError(f"input_embed_scale {self.input_embed_scale} is not a power of two")

    @classmethod
    def read(cls, path: str | Path) -> "MTPConfig":
        """The config.json of the drafter directory `path`."""
        path = Path(path)
        try:
            cfg = json.loads((path / "config.json").read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is not a drafter directory (no config.json)") from None
        if cfg.get("model_type") != "mtpdraft_mtp":
            raise ValueError(f"{path}: model_type {cfg.get('model_type')!r} is not an mtpdraft MTP drafter")
        cfg.pop("model_type")
        return cls(**cfg)

    @classmethod
    def for_target(cls, target: CausalLM, **kw) -> "MTPConfig":
        a = target.args
        kw.setdefault("use_ordered_embeddings", a.vocab_size % kw.get("num_centroids", 2048) == 0)
        return cls(backbone_hidden_size=a.hidden_size, vocab_size=a.vocab_size, head_dim=a.head_dim,
                   num_key_value_heads=a.num_key_value_heads, **kw)

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)


def _lin(x: torch.Tensor, m: Linear) -> torch.Tensor:
    """Drafting: the runtime's kernels. With autograd on (training): plain differentiable torch."""
    if torch.is_grad_enabled():
        return F.linear(x, m.weight if m.weight.dtype == x.dtype else m.weight.to(x.dtype))
    return m(x)


def _norm(x: torch.Tensor, m: RMSNorm) -> torch.Tensor:
    return reference_rmsnorm(x, m.weight, m.eps, m.offset) if torch.is_grad_enabled() else m(x)


def _native_weight(m: Linear):
    return m.qweight if m.qweight is not None else kernels.pack(m.weight)


def source_layers(layer_types: list[str], target: CausalLM) -> list[int]:
    """For each drafter layer type, the target layer whose K/V it reads: the last one of its type."""
    windows = target.layer_windows()
    last_full = max((i for i, w in enumerate(windows) if w == 0), default=len(windows) - 1)
    last_slide = max((i for i, w in enumerate(windows) if w > 0), default=last_full)
    return [last_slide if t == "sliding_attention" else last_full for t in layer_types]


class DraftAttention(nn.Module):
    def __init__(self, c: MTPConfig):
        super().__init__()
        self.heads, self.head_dim = c.num_attention_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * c.head_dim)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, offset=1.0)
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size)

    def forward(self, x, positions, src, attend):
        """x: [B, T, d]; positions: [B, T], each query's position; src: the target's
        Attention whose K/V are read (its RoPE frequencies and window apply);
        attend(q, window) -> [B, T, H, Dh]: the queries' attention over those K/V."""
        B, T, _ = x.shape
        q = _lin(x, self.q_proj).view(B, T, self.heads, self.head_dim)
        n = self.q_norm
        if torch.is_grad_enabled():
            q = apply_rope(_norm(q, n), positions, src.inv_freq)
        else:  # drafting: norm and RoPE in one native call
            q = kernels.norm_rope(q, positions, n.weight, n.eps, n.offset, src.inv_freq)
        out = attend(q, src.window)
        return _lin(out.reshape(B, T, -1), self.o_proj)


class DraftLayer(nn.Module):
    def __init__(self, c: MTPConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.self_attn = DraftAttention(c)
        self.mlp = nn.Module()
        self.mlp.gate_proj = Linear(c.hidden_size, c.intermediate_size)
        self.mlp.up_proj = Linear(c.hidden_size, c.intermediate_size)
        self.mlp.down_proj = Linear(c.intermediate_size, c.hidden_size)
        norm = lambda: RMSNorm(c.hidden_size, c.rms_norm_eps, offset=1.0)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(self, x, positions, src, attend):
        a = self.self_attn(_norm(x, self.input_layernorm), positions, src, attend)
        mlp, post, pre, post_ff = (self.mlp, self.post_attention_layernorm, self.pre_feedforward_layernorm,
                                   self.post_feedforward_layernorm)
        if torch.is_grad_enabled():  # training: differentiable torch ops
            x = x + _norm(a, post)
            h = _norm(x, pre)
            m = _lin(F.gelu(_lin(h, mlp.gate_proj), approximate="tanh") * _lin(h, mlp.up_proj), mlp.down_proj)
            return x + _norm(m, post_ff)
        # drafting: the same arithmetic in fewer native calls (residual + norms fused, gate|up one matrix)
        x, h = kernels.add_rmsnorm(x, a, post.weight, pre.weight, post.eps, post.offset)
        m = _lin(kernels.gated_act(linear(h, self._gate_up()), "gelu_tanh"), mlp.down_proj)
        return kernels.add_rmsnorm(x, m, post_ff.weight, None, post_ff.eps, post_ff.offset)[0]

    def _gate_up(self) -> torch.Tensor:
        """[gate; up] as one weight for drafting, rebuilt whenever training has changed either."""
        g, u = self.mlp.gate_proj, self.mlp.up_proj
        if g.qweight is not None:  # a quantized drafter (MTPDrafter.quantize): its weights are fixed
            if self.__dict__.get("_fused_q") is None:
                self.__dict__["_fused_q"] = kernels.QWeight.cat([g.qweight, u.qweight])
            return self.__dict__["_fused_q"]
        g, u = g.weight, u.weight
        key = (g.data_ptr(), kernels.version(g), u.data_ptr(), kernels.version(u))
        cached = self.__dict__.get("_fused")
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor: packing keys on its version
                fused = torch.cat([g, u])
            cached = self.__dict__["_fused"] = (key, kernels.pack(fused))
        return cached[1]


class MTPDrafter(nn.Module):
    def __init__(self, config: MTPConfig):
        super().__init__()
        c = self.config = config
        self.pre_projection = Linear(2 * c.backbone_hidden_size, c.hidden_size)
        self.post_projection = Linear(c.hidden_size, c.backbone_hidden_size)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(DraftLayer(c, t) for t in c.layer_types)
        self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, offset=1.0)
        if not c.tie_output_to_target:
            self.model.embed_tokens = nn.Module()  # the tied output table, in drafter width
            self.model.embed_tokens.weight = nn.Parameter(torch.empty(c.vocab_size, c.hidden_size),
                                                          requires_grad=False)
        if c.use_ordered_embeddings:
            self.masked_embedding = nn.Module()
            self.masked_embedding.centroids = Linear(self.head_width, c.num_centroids)
            self.masked_embedding.register_buffer("token_ordering", torch.arange(c.vocab_size))

    @property
    def head_width(self) -> int:
        """Width of the vector the head reads: d, or D when the head is the target's."""
        return self.config.backbone_hidden_size if self.config.tie_output_to_target else self.config.hidden_size

    def output_table(self, target: CausalLM) -> torch.Tensor:
        return target.head_weight if self.config.tie_output_to_target else self.model.embed_tokens.weight

    # -- construction, saving, loading ------------------------------------------------
    @classmethod
    def random(cls, config: MTPConfig, seed: int = 0, std: float = 0.02) -> "MTPDrafter":
        d = cls(config)
        g = torch.Generator().manual_seed(seed)
        for name, p in d.named_parameters():
            p.data = torch.zeros_like(p) if p.ndim == 1 else torch.randn(p.shape, generator=g) * std
        return d

    def _require_dense(self) -> None:
        if self.quantized:
            raise ValueError("a quantized drafter keeps no dense weights to save: save it before quantize()")

    def save(self, out: str | Path) -> Path:
        self._require_dense()
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, out / "model.safetensors")
        return out

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "MTPDrafter":
        path = Path(path)
        d = cls(MTPConfig.read(path))
        weights = load_file(str(path / "model.safetensors"))
        expected = d.state_dict()
        if set(weights) != set(expected):
            raise ValueError(f"{path}: malformed drafter checkpoint: missing {sorted(set(expected) - set(weights))[:4]}, "
                             f"unexpected {sorted(set(weights) - set(expected))[:4]}")
        for k, w in weights.items():
            if w.shape != expected[k].shape:
                raise ValueError(f"{path}: tensor {k} has shape {tuple(w.shape)}, config implies {tuple(expected[k].shape)}")
        d.load_state_dict(weights)
        return d.to_dtype(dtype)

    @property
    def quantized(self) -> bool:
        return self.pre_projection.qweight is not None

    def can_quantize(self) -> bool:
        return all(supported("Q8_0", *m.weight.shape) for m in self.modules() if isinstance(m, Linear))

    def quantize(self) -> "MTPDrafter":
        """Every matrix as Q8_0 blocks, drafted with the quantized kernels (kernels.qlinear): half
        the bytes of bf16 for each drafted token to read, where the target's own weights are
        quantized (its default). Drafting only (any draft is lossless): the dense weights are
        dropped, so a quantized drafter can be neither trained nor saved."""
        if self.quantized:
            return self
        if not self.can_quantize():
            raise ValueError("quantize: every matrix needs rows % 16 == 0 and columns % 32 == 0")
        for m in self.modules():
            if isinstance(m, Linear):
                m.qweight = kernels.QWeight.q8_0(m.weight)
                m.weight.data = torch.empty(0, dtype=m.weight.dtype)
        return self

    def to_dtype(self, dtype: torch.dtype) -> "MTPDrafter":
        for p in self.parameters():
            if p.ndim > 1:
                p.data = p.data.to(dtype)
        return self

    def check_target(self, target: CausalLM) -> None:
        c, a = self.config, target.args
        for mine, theirs, what in [(c.backbone_hidden_size, a.hidden_size, "hidden size"),
                                   (c.vocab_size, a.vocab_size, "vocabulary"),
                                   (c.head_dim, a.head_dim, "head_dim"),
                                   (c.num_key_value_heads, a.num_key_value_heads, "KV heads")]:
            if mine != theirs:
                raise ValueError(f"drafter does not match the target: {what} {mine} != {theirs}")

    # -- one drafting step ---------------------------------------------------------------
    def source_layers(self, target: CausalLM) -> list[int]:
        # kept per target: both are fixed once built, and every drafted token asks (~30 us of module lookups)
        cached = self.__dict__.get("_source_layers")  # (weak ref to the target, its layer indices)
        if cached is None or cached[0]() is not target:
            ids = source_layers([layer.layer_type for layer in self.model.layers], target)
            cached = self.__dict__["_source_layers"] = (weakref.ref(target), ids)
        return list(cached[1])

    def source_attentions(self, target: CausalLM) -> list:
        """For each drafter layer, the target's Attention whose K/V (RoPE, window, scale) it reads."""
        return [target.model.layers[i].self_attn for i in self.source_layers(target)]

    def sources(self, target: CausalLM, cache) -> list[tuple]:
        """For each drafter layer, (the target's Attention, its LayerCache) whose K/V it reads."""
        return [(target.model.layers[i].self_attn, cache.layers[i]) for i in self.source_layers(target)]

    def states(self, target: CausalLM, tokens: torch.Tensor, h: torch.Tensor, positions: torch.Tensor,
               srcs: list, attend):
        """The drafter's body, one forward for drafting and training: [B, T] steps at once
        (T = 1 when drafting; every position of a sequence in training, differentiable).

        tokens: [B, T]; h: [B, T, D] the incoming target-width state; positions: [B, T];
        srcs: per drafter layer, the target Attention it reads; attend(j, q, window) ->
        [B, T, H, Dh]: drafter layer j's attention. Returns (x [B, T, d] after the final
        norm, h' [B, T, D])."""
        with torch.no_grad():
            e = target.embed(tokens)
            if self.config.input_embed_scale != 1.0:
                e = e * self.config.input_embed_scale
        x = _lin(torch.cat([e, h.float()], -1), self.pre_projection)
        for j, (layer, src) in enumerate(zip(self.model.layers, srcs)):
            x = layer(x, positions, src, functools.partial(attend, j))
        x = _norm(x, self.model.norm)
        return x, _lin(x, self.post_projection)

    def step(self, target: CausalLM, tokens: torch.Tensor, h: torch.Tensor, positions: torch.Tensor, srcs):
        """tokens: [B]; h: [B, D]; positions: [B, 1]; srcs: sources(). Returns (ids [B, M]
        or None, logits [B, M or V], h' [B, D])."""
        def attend(j, q, window):  # the target's cached K/V up to the last verified position
            attn, layer_cache = srcs[j]
            return kernels.attention(q, layer_cache.k, layer_cache.v, positions, window=window, scale=attn.scale)

        x, h_next = self.states(target, tokens[:, None], h[:, None], positions, [a for a, _ in srcs], attend)
        x, h_next = x[:, 0], h_next[:, 0]  # [B, d], [B, D]
        table = self.output_table(target)
        y = h_next if self.config.tie_output_to_target else x
        if not self.config.use_ordered_embeddings:
            return None, linear(y, table), h_next
        c = self.config
        top = self.masked_embedding.centroids(y).topk(c.centroid_intermediate_top_k, dim=-1).indices  # [B, k_c]
        clusters = self.masked_embedding.token_ordering.view(c.num_centroids, -1)
        ids = clusters.index_select(0, top.reshape(-1)).view(top.shape[0], -1)  # [B, k_c * V/C]
        ordered = self._ordered_table(table) if y.shape[0] == 1 else None
        if ordered is not None:  # the selected clusters' panels of a cluster-ordered quantized copy
            parts = [ordered.parts[i] for i in top[0].tolist()]
            return ids, kernels.qlinear_parts(y, parts, ordered.types[0]), h_next
        logits = torch.einsum("bd,bmd->bm", y, kernels.take_rows(table, ids))
        return ids, logits, h_next

    def native_step(self, target: CausalLM):
        """step() as one native call (kernels.draft_step: the same kernels in the same order,
        so the same bits), built for `target` once and again whenever a weight of either
        changes (training, reloading) or a setting does (the top-k it searches); None where
        step() runs in Python (a subclass's layers, a dense head, no native kernels).

        A weight counts as changed when its data moves (`p.data = ...`, a dtype change) or
        is updated in place (an optimizer step, load_state_dict); the tensors are collected
        once per build, so a module whose Parameter object is replaced needs a new drafter
        (the target's tables are looked up each time: reloading its weights replaces them)."""
        tables = (target.embed_table, self.output_table(target))
        cached = self.__dict__.get("_native")  # (weak ref to the target, tables, tensors, their key, step)
        if cached is not None and cached[0]() is target and all(a is b for a, b in zip(cached[1], tables)) \
                and cached[3] == self._native_key(cached[2]):
            return cached[4]
        tensors = (*self.parameters(), *self.buffers(), *(p for t in tables for p in getattr(t, "parts", [t])))
        step = self._build_native(target)
        self.__dict__["_native"] = (weakref.ref(target), tables, tensors, self._native_key(tensors), step)
        return step

    def _native_key(self, tensors) -> tuple:
        # every drafted token checks it: the settings and each weight's address and version, not a module walk
        settings = tuple(tuple(v) if isinstance(v, list) else v for v in vars(self.config).values())
        return (settings, *((t.data_ptr(), kernels.version(t)) for t in tensors))

    def _build_native(self, target: CausalLM):
        c = self.config
        if type(self) is not MTPDrafter or not c.use_ordered_embeddings or \
                any(p.device.type != "cpu" for p in self.parameters()):
            return None
        table = self.output_table(target)
        head = self._ordered_table(table)
        if head is None and isinstance(table, kernels.QWeight):  # step() gathers its rows in Python
            return None
        layers = []
        for layer, src in zip(self.model.layers, self.source_attentions(target)):
            at, mlp = layer.self_attn, layer.mlp
            post, pre, post_ff = layer.post_attention_layernorm, layer.pre_feedforward_layernorm, \
                layer.post_feedforward_layernorm
            layers.append(dict(
                q=_native_weight(at.q_proj), o=_native_weight(at.o_proj), gate_up=layer._gate_up(),
                down=_native_weight(mlp.down_proj), in_norm=layer.input_layernorm.weight,
                in_eps=layer.input_layernorm.eps, in_offset=layer.input_layernorm.offset, q_norm=at.q_norm.weight,
                q_eps=at.q_norm.eps, q_offset=at.q_norm.offset, post_attn=post.weight, pre_mlp=pre.weight,
                res_eps=post.eps, res_offset=post.offset, post_mlp=post_ff.weight, mlp_eps=post_ff.eps,
                mlp_offset=post_ff.offset, inv_freq=src.inv_freq, scale=float(src.scale), heads=at.heads,
                head_dim=at.head_dim, window=int(src.window)))
        return kernels.draft_step(
            target.embed_table, target.embed_scale * c.input_embed_scale, _native_weight(self.pre_projection),
            _native_weight(self.post_projection), _native_weight(self.masked_embedding.centroids),
            self.model.norm.weight, self.model.norm.eps, self.model.norm.offset, c.tie_output_to_target,
            self.masked_embedding.token_ordering.view(c.num_centroids, -1), c.centroid_intermediate_top_k,
            head if head is not None else table, layers)

    def _ordered_table(self, table) -> "kernels.QWeight | None":
        """A quantized output table's rows in cluster order (built once, kept), one part a cluster.

        A quantized table stores 16 rows per panel, so gathering a cluster's scattered
        rows touches a cache line per 4 bytes of a row; in cluster order the candidates
        of a cluster are consecutive panels, read in one stream. (Drafting only: any q
        is lossless. A Q8_0 table keeps its values; other types are requantized to Q8_0.)"""
        c = self.config
        if not isinstance(table, kernels.QWeight) or len(table.parts) != 1 or (c.vocab_size // c.num_centroids) % PANEL:
            return None
        cached = getattr(self, "_ordered", None)
        if cached is None or cached[0] is not table:
            panels, qtype = permute_rows(table.parts[0].numpy(), table.types[0], table.shape[1],
                                         self.masked_embedding.token_ordering.numpy())
            clusters = list(torch.from_numpy(panels).chunk(c.num_centroids))  # views of one buffer
            cached = (table, kernels.QWeight(clusters, [qtype] * c.num_centroids, table.shape[1]))
            object.__setattr__(self, "_ordered", cached)
        return cached[1]


class MTPDraftSource:
    """Drafter-interface adapter: drives an MTPDrafter inside the decoding loop."""

    def __init__(self, drafter: MTPDrafter, min_confidence: float = 0.0):
        self.drafter, self.min_confidence = drafter, min_confidence

    @torch.inference_mode()
    def propose(self, ctx: DraftContext, k: int) -> Draft:
        cache, row = ctx.cache, ctx.row
        if cache.batch != 1:
            raise ValueError("MTPDraftSource drafts for one row at a time")
        # every step sits at the last verified token's position and reads the target's cache up to it
        positions = torch.tensor([[cache.lengths[row] - 1]])
        srcs = self.drafter.sources(ctx.target, cache)
        h = ctx.hidden[None]
        sp = ctx.sampling
        sampled = sp is not None and not sp.greedy
        native = self.drafter.native_step(ctx.target)
        if native is not None:
            kv = [lc.k for _, lc in srcs], [lc.v for _, lc in srcs]
            h = h.float()
            if not sampled:  # the whole greedy draft in one call
                return Draft(native.greedy(ctx.tokens[-1], h, positions, k, self.min_confidence, *kv))
            step = lambda tok, h: native.step(int(tok), h, positions, *kv)  # noqa: E731
        else:
            step = lambda tok, h: self.drafter.step(ctx.target, tok, h, positions, srcs)  # noqa: E731
        tok = torch.tensor([ctx.tokens[-1]])
        out: list[int] = []
        qs: list[tuple] = []  # per drafted token: (candidate ids or None, q over them)
        for i in range(k):
            ids, logits, h = step(tok, h)
            if sampled:  # draw from the drafter's own distribution at the request's settings
                q = target_probs(logits[0], sp)
                j = sample(q, ctx.generator)
            else:
                j = int(argmax(logits[0]))
            if i > 0 and self.min_confidence > 0:
                if float(torch.softmax(logits[0], -1)[j]) < self.min_confidence:
                    break
            t = int(ids[0, j]) if ids is not None else j
            out.append(t)
            if sampled:
                qs.append((ids, q))
            tok = torch.tensor([t])
        if not qs:
            return Draft(out)
        if qs[0][0] is None:  # an unclustered head: q over the whole vocabulary
            return Draft(out, torch.stack([q for _, q in qs]))
        # a clustered head scores only its candidates: q over them (0 elsewhere)
        return Draft(out, torch.stack([q for _, q in qs]), torch.cat([ids for ids, _ in qs]).long())

    def observe(self, accepted: int, proposed: int) -> None:
        pass
