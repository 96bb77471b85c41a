"""Stage 2: what the drafter reads, per position of every stored sequence.

One batched prefill per group of sequences (padded at the end: attention is
causal, so padding never changes a real position) gives, per position p:
  hidden[p]  the target's final-normed hidden state h_p      (bf16 by default, D)
  k/v[p]     the target's cached K/V of each layer the drafter reads (bf16 by default)
  labels[p]  the target's greedy next token after position p: the sequence's own
             token p+1 where the sequence was written greedily, else the argmax
             of the target's logits (bf16 head)
Cached as flat tensors (+ offsets) in shards; the training loop slices them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import kernels
from ..models.base import CausalLM


@dataclass
class Features:
    offsets: torch.Tensor  # [S + 1] start of each sequence in the flat arrays
    tokens: torch.Tensor  # [N] int64
    labels: torch.Tensor  # [N] int64, the greedy next token after each position (-1: unknown)
    train_from: torch.Tensor  # [S] first position p whose drafts are trained (the last prompt position)
    hidden: torch.Tensor  # [N, D] bf16
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per source layer, K and V [N, Hkv, Dh] bf16
    layers: list[int]  # target layer index of each kv entry

    @property
    def num_sequences(self) -> int:
        return self.offsets.numel() - 1

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def save(self, path: Path, ids: list[int] | None = None) -> None:
        """ids: the sequences' ids, stored beside (a data stage's recorded batch)."""
        state = {k: getattr(self, k) for k in self.__dataclass_fields__}
        torch.save(state if ids is None else {**state, "ids": list(ids)}, path)

    @classmethod
    def load(cls, path: Path, with_ids: bool = False, mmap: bool = False):
        """The features (and with_ids: (features, their sequences' ids or None)); mmap:
        tensors memory-mapped, read from the file as they are used."""
        state = torch.load(path, weights_only=True, mmap=mmap)
        ids = state.pop("ids", None)
        return (cls(**state), ids) if with_ids else cls(**state)

    def select(self, idx: list[int]) -> "Features":
        """Sequences idx of these, in that order (these features themselves when idx is all)."""
        if list(idx) == list(range(self.num_sequences)):
            return self
        spans = [slice(int(self.offsets[i]), int(self.offsets[i + 1])) for i in idx]
        pick = lambda t: torch.cat([t[s] for s in spans]) if spans else t[:0]  # noqa: E731
        lens = torch.tensor([s.stop - s.start for s in spans], dtype=torch.long)
        offsets = torch.zeros(len(idx) + 1, dtype=torch.long)
        offsets[1:] = lens.cumsum(0)
        return Features(offsets, pick(self.tokens), pick(self.labels), self.train_from[list(idx)],
                        pick(self.hidden), [(pick(k), pick(v)) for k, v in self.kv], self.layers)

    @classmethod
    def concat(cls, parts: list["Features"]) -> "Features":
        offs, base = [torch.zeros(1, dtype=torch.long)], 0
        for p in parts:
            offs.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        kv = [(torch.cat([p.kv[i][0] for p in parts]), torch.cat([p.kv[i][1] for p in parts]))
              for i in range(len(parts[0].kv))]
        return cls(torch.cat(offs), cat("tokens"), cat("labels"), cat("train_from"), cat("hidden"), kv,
                   parts[0].layers)

    def batch(self, idx: list[int]) -> dict:
        """Pad sequences idx to a common length: tokens, labels, hidden, kv (one per target
        layer of `layers`, which the batch names too), and per row the first position p
        from which drafts are trained (train_from)."""
        lens = [self.length(i) for i in idx]
        T = max(lens)
        B = len(idx)
        tok = torch.zeros(B, T, dtype=torch.long)
        lab = torch.full((B, T), -1, dtype=torch.long)
        hid = torch.zeros(B, T, self.hidden.shape[1], dtype=self.hidden.dtype)
        kv = [(torch.zeros(B, T, *k.shape[1:], dtype=k.dtype), torch.zeros(B, T, *v.shape[1:], dtype=v.dtype))
              for k, v in self.kv]
        for b, i in enumerate(idx):
            s, n = int(self.offsets[i]), lens[b]
            tok[b, :n] = self.tokens[s:s + n]
            lab[b, :n] = self.labels[s:s + n]
            hid[b, :n] = self.hidden[s:s + n]
            for (K, V), (k, v) in zip(kv, self.kv):
                K[b, :n], V[b, :n] = k[s:s + n], v[s:s + n]
        return {"tokens": tok, "labels": lab, "hidden": hid, "kv": kv, "layers": list(self.layers), "lengths": lens,
                "train_from": self.train_from[idx]}


def recorded_features(seqs: list[dict], recs: list[dict], layers: list[int],
                      dtype: torch.dtype = torch.bfloat16) -> Features:
    """The features of sequences whose decoding recorded them (`data.generate_batch(record=)`):
    what compute_features gives, from the decode's own forwards instead of a second prefill.
    A sequence's last position was never run: its hidden and K/V are zeros and it has no
    label (compute_features labels it on a sampled sequence; no loss reads it otherwise)."""
    def padded(t: torch.Tensor) -> torch.Tensor:  # + the never-run last position, as zeros
        return torch.cat([t.to(dtype), t.new_zeros(1, *t.shape[1:], dtype=dtype)])

    hs, kvs, labs = [], [([], []) for _ in layers], []
    for sq, rec in zip(seqs, recs):
        toks, n, lo = sq["tokens"], len(sq["tokens"]), sq["prompt_len"] - 1
        if rec["hidden"].shape[0] != n - 1 or len(rec["kv"]) != len(layers):
            raise ValueError(f"recorded features of {sq.get('id')} do not match its {n} tokens / {len(layers)} layers")
        hs.append(padded(rec["hidden"]))
        for (ks, vs), (k, v) in zip(kvs, rec["kv"]):
            ks.append(padded(k))
            vs.append(padded(v))
        lab = torch.full((n,), -1, dtype=torch.long)
        lab[:-1] = torch.tensor(toks[1:])
        if sq.get("greedy_from", sq["prompt_len"]) < 0:  # sampled text: the target's argmax is the label
            am = torch.tensor(rec["argmax"][:n - 1 - lo], dtype=torch.long)
            lab[lo:lo + len(am)] = torch.where(am >= 0, am, lab[lo:lo + len(am)])
        labs.append(lab)
    return _assemble(seqs, hs, kvs, labs, layers)


@torch.inference_mode()
def compute_features(model: CausalLM, seqs: list[dict], layers: list[int], batch_tokens: int = 4096,
                     chunk: int = 512, dtype: torch.dtype = torch.bfloat16) -> Features:
    """seqs: {"tokens", "prompt_len", "greedy_from"} dicts. greedy_from: the first
    index from which the tokens were written greedily (a sampled opening before it
    counts as prompt); -1 = sampled throughout, labelled by the target's argmax.
    dtype: how hidden states and K/V are stored (bf16 halves memory; fp32 is exact)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]["tokens"]))
    out_h: dict[int, torch.Tensor] = {}
    out_kv: dict[int, list] = {}
    out_lab: dict[int, torch.Tensor] = {}
    head = None
    i = 0
    while i < len(order):
        T = len(seqs[order[i]]["tokens"])
        group = [order[i]]
        while i + len(group) < len(order):
            nxt = order[i + len(group)]
            if (len(group) + 1) * len(seqs[nxt]["tokens"]) > batch_tokens:
                break
            group.append(nxt)
        T = max(len(seqs[g]["tokens"]) for g in group)
        B = len(group)
        toks = torch.zeros(B, T, dtype=torch.long)
        for b, g in enumerate(group):
            toks[b, :len(seqs[g]["tokens"])] = torch.tensor(seqs[g]["tokens"])
        step = min(chunk, T)
        cache = model.new_cache(B, T + 1, max_chunk=step)
        hs, kvs = [], [([], []) for _ in layers]
        for s in range(0, T, step):
            out = model(toks[:, s:s + step], cache, logits="none")
            n = out.hidden.shape[1]
            hs.append(out.hidden.to(dtype))
            for (ks, vs), li in zip(kvs, layers):
                lc = cache.layers[li]
                slots = torch.arange(s, s + n) % lc.capacity
                ks.append(lc.k[:, slots].to(dtype))
                vs.append(lc.v[:, slots].to(dtype))
        H = torch.cat(hs, 1)
        KV = [(torch.cat(ks, 1), torch.cat(vs, 1)) for ks, vs in kvs]
        for b, g in enumerate(group):
            sq = seqs[g]
            n = len(sq["tokens"])
            out_h[g] = H[b, :n].clone()
            out_kv[g] = [(k[b, :n].clone(), v[b, :n].clone()) for k, v in KV]
            lab = torch.full((n,), -1, dtype=torch.long)
            lab[:-1] = torch.tensor(sq["tokens"][1:])
            if sq.get("greedy_from", sq["prompt_len"]) < 0:  # sampled text: the target's argmax is the label
                if head is None:
                    head = kernels.dense(model.head_weight).to(torch.bfloat16)
                lo = sq["prompt_len"] - 1
                lab[lo:] = F.linear(H[b, lo:n].to(torch.bfloat16), head).argmax(-1)
            out_lab[g] = lab
        i += B
    idx = range(len(seqs))
    return _assemble(seqs, [out_h[g] for g in idx],
                     [([out_kv[g][j][0] for g in idx], [out_kv[g][j][1] for g in idx]) for j in range(len(layers))],
                     [out_lab[g] for g in idx], layers)


def _assemble(seqs: list[dict], hidden: list[torch.Tensor], kv: list[tuple[list, list]],
              labels: list[torch.Tensor], layers: list[int]) -> Features:
    """One Features from per-sequence rows (kv: per layer, the sequences' K list and V list).
    The one place that says where a sequence's trained drafts start: at its last prompt
    position, or at the last position of a sampled opening (greedy_from)."""
    lens = torch.tensor([len(sq["tokens"]) for sq in seqs], dtype=torch.long)
    offsets = torch.zeros(len(seqs) + 1, dtype=torch.long)
    offsets[1:] = lens.cumsum(0)
    return Features(
        offsets=offsets,
        tokens=torch.cat([torch.tensor(sq["tokens"]) for sq in seqs]),
        labels=torch.cat(labels),
        train_from=torch.tensor([max(0, max(sq["prompt_len"], sq.get("greedy_from", 0)) - 1) for sq in seqs]),
        hidden=torch.cat(hidden),
        kv=[(torch.cat(ks), torch.cat(vs)) for ks, vs in kv],
        layers=list(layers))
