"""Quantized weights in the layouts of `mtpdraft_qkernels.cpp`.

A GGUF tensor's blocks are rearranged losslessly (same bits, same bytes per
weight, give or take a few bytes of unpacked K-quant scales) into one record per
64 weights of a row (256 for the K-quants), so that the kernel decodes a chunk of
64 weights into 64 unsigned bytes in *chunk order*: position p holds weight
CHUNK_ORDER[p], the chunk's two blocks of 32 interleaved in groups of 4 (the
kernel's int32 lane p // 4 belongs to block (p // 4) % 2, so both fp16 block
scales become lane scales in one conversion). Values "at position p" below are in
that order:

| type | record | contents |
|---|---|---|
| Q8_0 | 64 weights, 68 B | 64 bytes w + 128, fp16 scale of each 32 |
| Q4_0 | 64 weights, 36 B | 32 bytes: low nibble position i, high nibble position 32+i; 2 fp16 scales |
| Q4_1 | 64 weights, 40 B | as Q4_0, then 2 fp16 mins |
| Q5_0 | 64 weights, 44 B | as Q4_0's nibbles, 64 high bits (bit p: position p), 2 fp16 scales |
| Q4_K | 256 weights, 148 B | 4 x 32 nibble bytes, fp16 d and dmin, 8 scales, 8 mins (6-bit values unpacked) |
| Q6_K | 256 weights, 210 B | 4 x 32 nibble bytes, 4 x 16 bytes of 2 high bits (positions i, 16+i, 32+i, 48+i), 16 int8 scales, fp16 d |

Weight values: Q8_0 d*q; Q4_0 d*(q-8); Q4_1 d*q+m; Q5_0 d*(q-16);
Q4_K (d*sc)*q - (dmin*m); Q6_K (d*sc)*(q-32): exactly what the file holds.
"""

from __future__ import annotations

import numpy as np
import torch

QTYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}
QNAMES = {v: k for k, v in QTYPES.items()}
# (weights per record, bytes per record)
RECORD = {"Q8_0": (64, 68), "Q4_0": (64, 36), "Q4_1": (64, 40), "Q5_0": (64, 44), "Q4_K": (256, 148), "Q6_K": (256, 210)}
# GGUF block sizes (weights, bytes) of the types we read
GGUF_BLOCK = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q4_K": (256, 144), "Q6_K": (256, 210)}


CHUNK_ORDER = np.array([((p >> 2) & 1) * 32 + (p >> 3) * 4 + (p & 3) for p in range(64)])  # = chunk_elem()
_NATURAL = np.argsort(CHUNK_ORDER)


def _to_chunk_order(q: np.ndarray) -> np.ndarray:
    """[..., n*64] weights in natural order -> the same in chunk order."""
    return q.reshape(*q.shape[:-1], -1, 64)[..., CHUNK_ORDER].reshape(q.shape)


def _to_natural(q: np.ndarray) -> np.ndarray:
    return q.reshape(*q.shape[:-1], -1, 64)[..., _NATURAL].reshape(q.shape)


def supported(qtype: str, k: int) -> bool:
    return qtype in RECORD and k % RECORD[qtype][0] == 0 and k % 64 == 0


def _nibbles(q: np.ndarray) -> np.ndarray:
    """q [..., n*64] in 0..15 -> [..., n, 32] bytes: low nibble weight i, high nibble 32+i of each 64."""
    q = q.reshape(*q.shape[:-1], -1, 2, 32).astype(np.uint8)
    return q[..., 0, :] | (q[..., 1, :] << 4)


def _f16(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.float16).astype(np.float32)


def _bits64(b: np.ndarray) -> np.ndarray:
    """b [..., n*64] in {0,1} -> [..., n, 8] bytes, bit i of the 64-bit word = element i."""
    return np.packbits(b.reshape(*b.shape[:-1], -1, 64).astype(np.uint8), axis=-1, bitorder="little")


def _k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 packed bytes -> (8 scales, 8 mins), 6 bits each."""
    s = s.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def repack_gguf(raw: np.ndarray, qtype: str, rows: int, k: int) -> np.ndarray:
    """GGUF blocks of a [rows, k] tensor (uint8, rows x k/bs*bb bytes) -> kernel records [rows, bytes]."""
    bs, bb = GGUF_BLOCK[qtype]
    b = np.asarray(raw, dtype=np.uint8).reshape(rows, k // bs, bb)
    if qtype == "Q8_0":
        q = _to_chunk_order(b[..., 2:].reshape(rows, k) ^ 0x80).reshape(rows, k // 64, 64)
        d = b[..., :2].reshape(rows, k // 64, 4)
        return np.concatenate([q, d], -1).reshape(rows, -1)
    if qtype in ("Q4_0", "Q4_1", "Q5_0"):
        qs = b[..., bb - 16:]
        q = _to_chunk_order(np.concatenate([qs & 0xF, qs >> 4], -1).reshape(rows, k))
        parts = [_nibbles(q)]
        if qtype == "Q5_0":
            qh = b[..., 2:6].copy().view(np.uint32)[..., 0]  # [rows, nb]
            hi = (qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1
            parts.append(_bits64(_to_chunk_order(hi.reshape(rows, k))))
        parts.append(b[..., :2].reshape(rows, k // 64, 4))
        if qtype == "Q4_1":
            parts.append(b[..., 2:4].reshape(rows, k // 64, 4))
        return np.concatenate(parts, -1).reshape(rows, -1)
    if qtype == "Q4_K":
        sc, mn = _k4_scales(b[..., 4:16])
        nib = b[..., 16:].reshape(rows, k // 256, 4, 32)  # per 64: low nibbles weights 0-31, high 32-63
        q = _to_chunk_order(np.concatenate([nib & 0xF, nib >> 4], -1).reshape(rows, k))
        return np.concatenate([_nibbles(q).reshape(rows, k // 256, 128), b[..., 0:4], sc, mn], -1).reshape(rows, -1)
    if qtype == "Q6_K":
        ql, qh, scales, d = b[..., :128], b[..., 128:192], b[..., 192:208], b[..., 208:210]
        q = np.empty((rows, k // 256, 256), np.uint8)
        for h in range(2):  # two halves of 128 weights
            l_, hh = ql[..., 64 * h:64 * h + 64], qh[..., 32 * h:32 * h + 32]
            base = 128 * h
            q[..., base + 0:base + 32] = (l_[..., :32] & 0xF) | ((hh & 3) << 4)
            q[..., base + 32:base + 64] = (l_[..., 32:] & 0xF) | (((hh >> 2) & 3) << 4)
            q[..., base + 64:base + 96] = (l_[..., :32] >> 4) | (((hh >> 4) & 3) << 4)
            q[..., base + 96:base + 128] = (l_[..., 32:] >> 4) | (((hh >> 6) & 3) << 4)
        q = _to_chunk_order(q.reshape(rows, k)).reshape(rows, k // 256, 256)
        nib = _nibbles(q & 0xF).reshape(rows, k // 256, 128)
        hi = (q >> 4).reshape(rows, k // 256, 4, 4, 16)  # [chunk, quarter, i]
        plane = hi[..., 0, :] | (hi[..., 1, :] << 2) | (hi[..., 2, :] << 4) | (hi[..., 3, :] << 6)
        return np.concatenate([nib, plane.reshape(rows, k // 256, 64), scales, d], -1).reshape(rows, -1)
    raise ValueError(f"unsupported quantized type {qtype}")


def dequantize(data: np.ndarray, qtype: str, k: int) -> np.ndarray:
    """Reference: kernel records [rows, bytes] -> exact fp32 weights [rows, k]."""
    rows = data.shape[0]
    n, rb = RECORD[qtype]
    r = np.asarray(data, np.uint8).reshape(rows, k // n, rb)
    if qtype in ("Q8_0", "Q4_0", "Q4_1", "Q5_0"):
        if qtype == "Q8_0":
            q = r[..., :64].astype(np.int32) - 128
            d = _f16(r[..., 64:68]).reshape(rows, -1, 2)
        else:
            nib = r[..., :32]
            q = np.concatenate([nib & 0xF, nib >> 4], -1).astype(np.int32)
            if qtype == "Q5_0":
                hi = np.unpackbits(r[..., 32:40], axis=-1, bitorder="little").astype(np.int32)
                q = q + 16 * hi - 16
            elif qtype == "Q4_0":
                q = q - 8
            off = 40 if qtype == "Q5_0" else 32
            d = _f16(r[..., off:off + 4]).reshape(rows, -1, 2)
        q = _to_natural(q.reshape(rows, k))
        w = q.reshape(rows, -1, 2, 32).astype(np.float32) * d[..., None]
        if qtype == "Q4_1":
            w = w + _f16(r[..., 36:40]).reshape(rows, -1, 2)[..., None]
        return w.reshape(rows, k)
    if qtype == "Q4_K":
        nib = r[..., :128].reshape(rows, -1, 4, 32)
        q = _to_natural(np.concatenate([nib & 0xF, nib >> 4], -1).reshape(rows, k))
        q = q.reshape(rows, -1, 8, 32).astype(np.float32)
        d, dmin = _f16(r[..., 128:130]), _f16(r[..., 130:132])
        sc, mn = r[..., 132:140].astype(np.float32), r[..., 140:148].astype(np.float32)
        return ((d * sc)[..., None] * q - (dmin * mn)[..., None]).reshape(rows, k)
    if qtype == "Q6_K":
        nib = r[..., :128].reshape(rows, -1, 4, 32)
        lo = np.concatenate([nib & 0xF, nib >> 4], -1)  # [rows, nb, 4, 64]
        pl = r[..., 128:192].reshape(rows, -1, 4, 1, 16)
        hi = ((pl >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3).reshape(rows, -1, 4, 64)
        q = _to_natural((lo | (hi << 4)).astype(np.int32).reshape(rows, k) - 32)
        sc = r[..., 192:208].view(np.int8).astype(np.float32)
        d = _f16(r[..., 208:210])
        return ((d * sc)[..., None] * q.reshape(rows, -1, 16, 16).astype(np.float32)).reshape(rows, k)
    raise ValueError(f"unsupported quantized type {qtype}")


def quantize_q8_0(w: torch.Tensor) -> np.ndarray:
    """Float [rows, k] (k % 64 == 0) -> Q8_0 records: per 32 weights d = absmax/127 (fp16), q = round(w/d)."""
    rows, k = w.shape
    b = w.detach().float().reshape(rows, k // 32, 32)
    d16 = (b.abs().amax(-1) / 127).to(torch.float16)
    d = d16.float()
    q = torch.where(d[..., None] > 0, torch.round(b / d.clamp(min=torch.finfo(torch.float32).tiny)[..., None]),
                    torch.zeros_like(b)).clamp(-127, 127).to(torch.int8)
    qn = _to_chunk_order(q.numpy().view(np.uint8).reshape(rows, k) ^ 0x80).reshape(rows, k // 64, 64)
    dn = d16.numpy().view(np.uint8).reshape(rows, k // 64, 4)
    return np.concatenate([qn, dn], -1).reshape(rows, -1)
