"""Preallocated per-layer KV cache with free rollback.

Each layer owns K/V buffers of shape [B, C, Hkv, D]; position p of row b lives in
slot p % C. Global layers get C = max_len; sliding-window layers get
C = window + max_chunk, enough for the widest forward to still see its whole
window. Rolling back is just lowering a row's length: the next write overwrites
the rejected slots, so nothing is copied or freed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class LayerCache:
    k: torch.Tensor  # [B, C, Hkv, D]
    v: torch.Tensor  # [B, C, Hkv, D]
    window: int  # 0 = full attention

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """k, v: [B, N, Hkv, D]; positions: [B, N] absolute positions."""
        B, N = positions.shape
        start = int(positions[0, 0]) % self.capacity
        if B == 1 and start + N <= self.capacity:  # the common case: one contiguous slice
            self.k[0, start:start + N] = k[0]
            self.v[0, start:start + N] = v[0]
            return
        slots = positions % self.capacity
        rows = torch.arange(B).unsqueeze(1).expand_as(slots)
        self.k[rows, slots] = k.to(self.k.dtype)
        self.v[rows, slots] = v.to(self.v.dtype)

    def keys_at(self, row: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached K, V of `row` at absolute `positions` ([L] -> [L, Hkv, D] each)."""
        slots = positions % self.capacity
        return self.k[row, slots], self.v[row, slots]


class KVCache:
    """KV cache for a whole model: one LayerCache per layer plus each row's length."""

    def __init__(self, layers: list[LayerCache], max_len: int, max_chunk: int):
        self.layers = layers
        self.max_len = max_len
        self.max_chunk = max_chunk
        self.lengths = [0] * layers[0].k.shape[0]

    @classmethod
    def allocate(cls, *, batch: int, windows: list[int], num_kv_heads: int, head_dim: int,
                 max_len: int, max_chunk: int, dtype: torch.dtype) -> "KVCache":
        layers = []
        for w in windows:
            cap = max_len if w == 0 else min(max_len, w + max_chunk)
            shape = (batch, cap, num_kv_heads, head_dim)
            layers.append(LayerCache(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype), w))
        return cls(layers, max_len, max_chunk)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def positions(self, n: int, rows: list[int] | None = None) -> torch.Tensor:
        """Positions [B, n] of n new tokens appended to each row."""
        rows = range(self.batch) if rows is None else rows
        start = torch.tensor([self.lengths[r] for r in rows]).unsqueeze(1)
        pos = start + torch.arange(n).unsqueeze(0)
        if n > self.max_chunk:
            raise ValueError(f"a forward takes at most {self.max_chunk} tokens, got {n}")
        if int(pos.max()) >= self.max_len:
            raise ValueError(f"context full: {int(pos.max()) + 1} tokens exceed max_len={self.max_len}")
        return pos

    def advance(self, n: int, rows: list[int] | None = None) -> None:
        for r in range(self.batch) if rows is None else rows:
            self.lengths[r] += n

    def rows(self, lo: int, hi: int) -> "KVCache":
        """A cache over rows lo..hi-1 that shares these buffers (writes land here too).
        Its lengths are a copy: the caller writes them back after a forward."""
        view = KVCache([LayerCache(l.k[lo:hi], l.v[lo:hi], l.window) for l in self.layers], self.max_len,
                       self.max_chunk)
        view.lengths = self.lengths[lo:hi]
        return view

    def truncate(self, row: int, length: int) -> None:
        """Roll row back to `length` tokens (O(1): later writes overwrite the rest)."""
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"cannot truncate row {row} of length {self.lengths[row]} to {length}")
        self.lengths[row] = length

    def reset(self, row: int | None = None) -> None:
        for r in range(self.batch) if row is None else [row]:
            self.lengths[r] = 0
