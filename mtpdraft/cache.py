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
    """KV cache for a whole model: one LayerCache per layer plus each row's length.

    The lengths belong to the cache: read them with `lengths`, change them with
    `advance` (a forward), `truncate` (rollback), `reset` and `move_row`. A `rows()`
    view shares them, so a forward on a view moves the parent's rows too."""

    def __init__(self, layers: list[LayerCache], max_len: int, max_chunk: int,
                 _lengths: list[int] | None = None, _lo: int = 0):
        self.layers = layers
        self.max_len = max_len
        self.max_chunk = max_chunk
        self._batch = layers[0].k.shape[0]
        self._all = _lengths if _lengths is not None else [0] * self._batch
        self._lo = _lo

    @classmethod
    def allocate(cls, *, batch: int, windows: list[int], num_kv_heads: int | list[int], head_dim: int | list[int],
                 max_len: int, max_chunk: int, dtype: torch.dtype, shared: list[int | None] | None = None) -> "KVCache":
        """One LayerCache per layer. Per-layer KV heads / head dims may be lists; a layer
        whose `shared` entry names an earlier layer gets that very LayerCache (it reads
        what its source wrote)."""
        n = len(windows)
        heads = num_kv_heads if isinstance(num_kv_heads, list) else [num_kv_heads] * n
        dims = head_dim if isinstance(head_dim, list) else [head_dim] * n
        layers: list[LayerCache] = []
        for i, w in enumerate(windows):
            src = shared[i] if shared else None
            if src is not None:
                layers.append(layers[src])
                continue
            cap = max_len if w == 0 else min(max_len, w + max_chunk)
            shape = (batch, cap, heads[i], dims[i])
            layers.append(LayerCache(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype), w))
        return cls(layers, max_len, max_chunk)

    @property
    def batch(self) -> int:
        return self._batch

    @property
    def lengths(self) -> tuple[int, ...]:
        """Tokens cached per row (read-only: see the class docstring)."""
        return tuple(self._all[self._lo:self._lo + self._batch])

    def _row(self, r: int) -> int:
        if not 0 <= r < self._batch:
            raise IndexError(f"row {r} outside a cache of {self._batch} rows")
        return self._lo + r

    def positions(self, n: int, rows: list[int] | None = None) -> torch.Tensor:
        """Positions [B, n] of n new tokens appended to each row."""
        rows = range(self.batch) if rows is None else rows
        starts = [self._all[self._row(r)] for r in rows]
        if n > self.max_chunk:
            raise ValueError(f"a forward takes at most {self.max_chunk} tokens, got {n}")
        if starts and max(starts) + n > self.max_len:
            raise ValueError(f"context full: {max(starts) + n} tokens exceed max_len={self.max_len}")
        return torch.tensor([[s + i for i in range(n)] for s in starts], dtype=torch.long).reshape(len(starts), n)

    def advance(self, n: int, rows: list[int] | None = None) -> None:
        for r in range(self.batch) if rows is None else rows:
            self._all[self._row(r)] += n

    def rows(self, lo: int, hi: int) -> "KVCache":
        """A cache over rows lo..hi-1 that shares these buffers and lengths."""
        if not 0 <= lo < hi <= self._batch:
            raise IndexError(f"rows {lo}..{hi - 1} outside a cache of {self._batch} rows")
        if lo == 0 and hi == self._batch:
            return self
        views: dict[int, LayerCache] = {}  # a shared LayerCache stays shared in the view
        layers = [views.setdefault(id(l), LayerCache(l.k[lo:hi], l.v[lo:hi], l.window)) for l in self.layers]
        return KVCache(layers, self.max_len, self.max_chunk, self._all, self._lo + lo)

    def truncate(self, row: int, length: int) -> None:
        """Roll row back to `length` tokens (O(1): later writes overwrite the rest)."""
        r = self._row(row)
        if not 0 <= length <= self._all[r]:
            raise ValueError(f"cannot truncate row {row} of length {self._all[r]} to {length}")
        self._all[r] = length

    def reset(self, row: int | None = None) -> None:
        for r in range(self.batch) if row is None else [row]:
            self._all[self._row(r)] = 0

    def move_row(self, src: int, dst: int) -> None:
        """Copy row src (K/V and length) into row dst; src is left empty."""
        done = set()
        for l in self.layers:
            if id(l) not in done:
                done.add(id(l))
                l.k[dst].copy_(l.k[src])
                l.v[dst].copy_(l.v[src])
        self._all[self._row(dst)] = self._all[self._row(src)]
        self._all[self._row(src)] = 0
