"""The drafter's differentiable training forward, its head initialisation and its loss.

Inference (`MTPDrafter.step`) drafts for ONE last-verified position p at a time,
through the non-differentiable batch-invariant kernels. Training runs the same
forward (`MTPDrafter.states`, which switches to plain torch ops when autograd is
on) for EVERY position p of a stored sequence at once: the query of row p sits at RoPE position p and attends to the target's
cached K/V of positions <= p (and > p - window on sliding layers), which is
exactly causal self-attention between the rows' queries and the sequence's
stored K/V. Step j of row p reads the true token t_{p+j} and the drafter's own
h from step j-1 (the target's h_p for step 1) and predicts t_{p+j+1}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from ..drafters.mtp import MTPConfig, MTPDrafter, source_layers
from ..models.base import CausalLM

__all__ = ["source_layers", "unrolled", "draft_step", "head_loss", "inference_correct", "new_drafter"]


def _lin(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype))


def attention_mask(T: int, window: int) -> torch.Tensor:
    """[T, T] bool, True = row p may read key position q: q <= p (and q > p - window)."""
    p = torch.arange(T)[:, None]
    q = torch.arange(T)[None, :]
    m = q <= p
    if window > 0:
        m &= q > p - window
    return m


def draft_step(drafter: MTPDrafter, target: CausalLM, tokens: torch.Tensor, h: torch.Tensor,
               kv: list[tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor, masks: dict | None = None):
    """One drafting step for every row at once: the inference drafter's own forward
    (`MTPDrafter.states`, differentiable with autograd on), its attention over the
    sequence's stored K/V as causal self-attention.

    tokens: [B, T] the step's input token per row; h: [B, T, D] the incoming hidden;
    kv: per drafter layer, the target's K, V [B, T, Hkv, Dh] of the sequence;
    positions: [B, T] (row p sits at p); masks: {window: [T, T] bool} (filled as needed).
    Returns (x [B, T, d] after the final norm, h' [B, T, D]).
    """
    masks = {} if masks is None else masks
    T = tokens.shape[1]

    def attend(j, q, window):
        # fp32, or the trainer's autocast dtype (autocast leaves attention in its inputs' dtype)
        dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
        q, k, v = q.to(dt), kv[j][0].to(dt), kv[j][1].to(dt)
        if q.shape[2] != k.shape[2]:
            k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
            v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
        if window not in masks:
            masks[window] = attention_mask(T, window)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=masks[window], scale=srcs[j].scale)
        return o.transpose(1, 2)

    srcs = drafter.source_attentions(target)
    return drafter.states(target, tokens, h, positions, srcs, attend)


def unrolled(drafter: MTPDrafter, target: CausalLM, seq: torch.Tensor, h0: torch.Tensor,
             kv: list[tuple[torch.Tensor, torch.Tensor]], steps: int):
    """Teacher-forced unrolled drafting over whole sequences.

    seq: [B, T] token ids (padding anywhere after a row's end); h0: [B, T, D] the
    target's final hidden per position. Returns per step j = 1..steps the pair
    (x_j, h_j), each [B, T, ...]; row p of step j predicts seq[p + j + 1].
    """
    B, T = seq.shape
    positions = torch.arange(T).expand(B, T)
    masks: dict = {}
    ext = torch.cat([seq, torch.zeros(B, steps, dtype=seq.dtype)], 1)
    h, outs = h0.float(), []
    for j in range(1, steps + 1):
        x, h = draft_step(drafter, target, ext[:, j:j + T], h, kv, positions, masks)
        outs.append((x, h))
    return outs


# -- the clustered head ---------------------------------------------------------------
_DENSE: dict = {}


def output_table(drafter: MTPDrafter, target: CausalLM) -> torch.Tensor:
    """The drafter's output table as a tensor: a quantized target's table (a tied head)
    dequantized once to fp32 and kept while that table is in use."""
    table = drafter.output_table(target)
    if not isinstance(table, kernels.QWeight):
        return table
    if _DENSE.get("source") is not table:
        _DENSE.clear()
        _DENSE.update(source=table, dense=kernels.dense(table))
    return _DENSE["dense"]


def balanced_clusters(table: torch.Tensor, num_clusters: int, iters: int = 6, seed: int = 0,
                      dims: int = 64) -> torch.Tensor:
    """Token ordering: a permutation of the vocabulary whose consecutive blocks of
    V/C tokens are clusters of similar output-embedding rows.

    Balanced recursive bisection: split each group at the median of its rows'
    projection on the group's top principal direction (a few power iterations),
    on the rows' top `dims` principal components (cheap for a 262k x 640 table).
    For a C that is not a power of two the last split is a sort on one direction.
    """
    V, D = table.shape
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    W = table.float()
    if dims and D > dims:
        mean = W.mean(0, keepdim=True)
        _, _, vec = torch.pca_lowrank(W - mean, q=dims, center=False, niter=2)
        W = (W - mean) @ vec
        D = dims
    order = torch.arange(V)
    groups = 1
    while groups < num_clusters:
        split = 2 if num_clusters % (groups * 2) == 0 else num_clusters // groups
        n = V // groups
        X = W[order].view(groups, n, D)
        X = X - X.mean(1, keepdim=True)
        v = torch.randn(groups, D, 1, generator=g)
        for _ in range(iters):
            v = X.transpose(1, 2) @ (X @ v)
            v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        proj = (X @ v)[..., 0]  # [groups, n]
        idx = proj.argsort(dim=1, stable=True)
        order = order.view(groups, n).gather(1, idx).reshape(-1)
        groups *= split
        del X
    return order


def init_head(drafter: MTPDrafter, target: CausalLM, seed: int = 0) -> None:
    """Cluster the target's output embeddings into the drafter's token ordering and
    start each centroid at its cluster's mean row (tied head only)."""
    c = drafter.config
    if not c.use_ordered_embeddings:
        return
    table = output_table(drafter, target).detach()
    order = balanced_clusters(table, c.num_centroids, seed=seed)
    drafter.masked_embedding.token_ordering.copy_(order)
    if c.tie_output_to_target:
        means = table.float()[order].view(c.num_centroids, -1, table.shape[1]).mean(1)
        drafter.masked_embedding.centroids.weight.data = means.to(drafter.masked_embedding.centroids.weight.dtype)


def cluster_of(drafter: MTPDrafter) -> torch.Tensor:
    """[V] the cluster index of every token."""
    c = drafter.config
    order = drafter.masked_embedding.token_ordering
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel())
    return inv // (c.vocab_size // c.num_centroids)


_ORDERED: dict = {}


def ordered_table(drafter: MTPDrafter, target: CausalLM) -> torch.Tensor:
    """The output table in fp32 with its rows in token_ordering, as [C, V/C, width]
    (cached: converted once, not per batch)."""
    c = drafter.config
    table = output_table(drafter, target)
    order = drafter.masked_embedding.token_ordering
    key = (id(drafter), id(table), table.data_ptr(), table._version, int(order[:8].sum()), int(order[-8:].sum()))
    if key not in _ORDERED:
        _ORDERED.clear()
        _ORDERED[key] = table.detach()[order].float().view(c.num_centroids, c.vocab_size // c.num_centroids, -1)
    return _ORDERED[key]


def _segments(cand: torch.Tensor):
    """(row, cluster) pairs of cand [N, M] grouped by cluster: the pair order, the
    pairs' rows in that order, and (cluster, start, end) per group."""
    flat = cand.reshape(-1)
    order = torch.argsort(flat, stable=True)
    rows = order // cand.shape[1]
    uniq, counts = torch.unique_consecutive(flat[order], return_counts=True)
    ends = counts.cumsum(0).tolist()
    starts = [0] + ends[:-1]
    return order, rows, list(zip(uniq.tolist(), starts, ends))


class _ClusterDot(torch.autograd.Function):
    """logits[n, m*per + i] = y[n] . ordered[cand[n, m], i] for a frozen table.

    Pairs are grouped by cluster, so each candidate cluster's rows are read once
    per batch and multiplied by all the rows that need them (one small matmul per
    cluster) instead of being gathered once per (row, cluster) pair."""

    @staticmethod
    def forward(ctx, y, ordered, cand):
        N, M = cand.shape
        per = ordered.shape[1]
        order, rows, segs = _segments(cand)
        ys = y[rows]
        out = torch.empty(N * M, per, dtype=torch.float32)
        part = torch.empty(N * M, per, dtype=torch.float32)
        for c, s, e in segs:
            torch.mm(ys[s:e], ordered[c].t(), out=part[s:e])
        out[order] = part
        ctx.save_for_backward(order, rows)
        ctx.ordered, ctx.segs, ctx.shape = ordered, segs, (N, M)
        return out.view(N, M * per)

    @staticmethod
    def backward(ctx, g):
        order, rows = ctx.saved_tensors
        ordered, segs = ctx.ordered, ctx.segs
        N, M = ctx.shape
        gs = g.reshape(N * M, -1)[order]
        part = torch.empty(N * M, ordered.shape[2], dtype=torch.float32)
        for c, s, e in segs:
            torch.mm(gs[s:e], ordered[c], out=part[s:e])
        gy = torch.zeros(N, ordered.shape[2], dtype=torch.float32).index_add_(0, rows, part)
        return gy, None, None


def cluster_dot(y: torch.Tensor, ordered: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    return _ClusterDot.apply(y.contiguous(), ordered, cand)


def head_loss(drafter: MTPDrafter, target: CausalLM, y: torch.Tensor, labels: torch.Tensor, clusters: torch.Tensor,
              extra_clusters: int = 1, centroid_weight: float = 1.0, teacher: torch.Tensor | None = None,
              distill_weight: float = 0.0):
    """Reduced-cost loss of the clustered head for rows y [N, width] and labels [N].

    Centroid cross-entropy on the label's cluster, plus token cross-entropy over the
    tokens of the label's cluster and of the `extra_clusters` best-scored other
    clusters (the competitors the inference argmax sees most). With `teacher` [N, D]
    (the target's final hidden state whose logits chose the label; tied head only) and
    distill_weight w, the token term becomes (1 - w) * that cross-entropy + w * the
    cross-entropy to the target's own distribution over the same candidates (a KL to
    p restricted to them: what sampling-aware drafting needs). Returns (loss, correct
    [N] bool: a cheap proxy of the inference head's hit, the label's cluster in the top
    k_c and the label the argmax of the candidate set).
    """
    c = drafter.config
    table = output_table(drafter, target)
    if not c.use_ordered_embeddings:
        logits = _lin(y, table.float())
        return F.cross_entropy(logits, labels), logits.argmax(-1) == labels
    per = c.vocab_size // c.num_centroids
    cl = _lin(y, drafter.masked_embedding.centroids.weight)  # [N, C]
    lab_c = clusters[labels]
    loss_c = F.cross_entropy(cl, lab_c)
    with torch.no_grad():
        top = cl.topk(extra_clusters + 1, dim=-1).indices
        # the label's cluster first, then the best others (a duplicate of the label's is dropped below)
        cand = torch.cat([lab_c[:, None], top], 1)
        dup = torch.zeros_like(cand, dtype=torch.bool)
        dup[:, 1:] = top == lab_c[:, None]
        # keep exactly extra_clusters others per row
        keep = ~dup & ((~dup).cumsum(1) <= extra_clusters + 1)
        cand = cand[keep].view(-1, extra_clusters + 1)
        ordering = drafter.masked_embedding.token_ordering.view(c.num_centroids, per)
        tgt = (ordering[lab_c] == labels[:, None]).float().argmax(1)  # label's index inside its cluster
    logits = cluster_dot(y.float(), ordered_table(drafter, target), cand)  # [N, (1 + extra) * per]
    loss_t = F.cross_entropy(logits, tgt)
    if distill_weight > 0 and teacher is not None:
        if not c.tie_output_to_target:
            raise ValueError("distillation needs the target's head (tie_output_to_target)")
        with torch.no_grad():
            p = cluster_dot(teacher.float(), ordered_table(drafter, target), cand)
            cap = target.args.final_logit_softcapping
            p = torch.softmax(kernels.softcap(p, cap) if cap else p, -1)
        loss_t = (1 - distill_weight) * loss_t + distill_weight * F.cross_entropy(logits, p)
    with torch.no_grad():
        # the label's cluster ranks in the top k_c (a comparison count: a topk over all clusters costs more)
        in_top = (cl > cl.gather(1, lab_c[:, None])).sum(1) < c.centroid_intermediate_top_k
        correct = (logits.argmax(-1) == tgt) & in_top
    return loss_t + centroid_weight * loss_c, correct


@torch.no_grad()
def inference_correct(drafter: MTPDrafter, target: CausalLM, y: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N] bool: the head's prediction exactly as MTPDrafter.step makes it == label."""
    c = drafter.config
    table = output_table(drafter, target)
    if not c.use_ordered_embeddings:
        return _lin(y, table.float()).argmax(-1) == labels
    ids, logits = head_candidates(drafter, target, y)
    return ids.gather(1, logits.argmax(-1, keepdim=True))[:, 0] == labels


def searched_clusters(drafter: MTPDrafter, y: torch.Tensor) -> torch.Tensor:
    """[N, top_k] the clusters the centroids pick for rows y [N, width], as at inference."""
    c = drafter.config
    return _lin(y.float(), drafter.masked_embedding.centroids.weight.float()).topk(c.centroid_intermediate_top_k, -1).indices


@torch.no_grad()
def cluster_recalled(drafter: MTPDrafter, y: torch.Tensor, labels: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """[N] bool: the label's cluster is among those searched for rows y: the clustered
    head cannot draft a label outside them."""
    return (searched_clusters(drafter, y) == clusters[labels][:, None]).any(-1)


@torch.no_grad()
def head_candidates(drafter: MTPDrafter, target: CausalLM, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The clustered head at inference for rows y [N, width]: the token ids of the top-k
    clusters the centroids pick and their logits, both [N, top_k * V/C], in the same order."""
    c = drafter.config
    clusters = drafter.masked_embedding.token_ordering.view(c.num_centroids, -1)
    y = y.float()
    top = searched_clusters(drafter, y)
    return clusters[top].flatten(1), cluster_dot(y, ordered_table(drafter, target), top)


def new_drafter(target: CausalLM, cfg: dict, seed: int) -> MTPDrafter:
    """A freshly initialised drafter for `target` (head clustered from its table)."""
    config = MTPConfig.for_target(target, **cfg)
    d = MTPDrafter.random(config, seed=seed)
    # norms: the offset-1 scales start at 1 (weight 0) as MTPDrafter.random leaves them
    init_head(d, target, seed)
    return d
