"""Quantized weights in the layout of `mtpdraft_qkernels.cpp`.

A GGUF tensor's blocks are rearranged losslessly (same bits, same bytes per weight,
give or take a few bytes of unpacked K-quant scales) into *panels* of 16 output
rows. A panel is a sequence of units, one per 32-weight block (256 for the
K-quants), each holding that block for all 16 rows. A block's values are 8
"registers" of 64 bytes: byte 4j + i of register k is row j's weight 4k + i of the
block, stored unsigned (u = q + offset). Inside a unit:

| type | unit | contents |
|---|---|---|
| Q8_0 | 32 weights, 544 B | 16 fp16 scales; 8 registers of w + 128 |
| Q4_0 | 32 weights, 288 B | 16 fp16 scales; 4 x 64 nibble bytes: byte t of 64-byte group L = register L (low) and L + 4 (high) |
| Q4_1 | 32 weights, 320 B | 16 fp16 scales, 16 fp16 mins, nibbles as Q4_0 |
| Q5_0 | 32 weights, 352 B | 16 fp16 scales, nibbles as Q4_0, 8 x 64 bits: bit t of word k = fifth bit of register k byte t |
| Q4_K | 256 weights, 2368 B | 16 fp16 d, 16 fp16 dmin, [8 sub-blocks][16] scales, [8][16] mins (6-bit values unpacked), 8 x 256 nibble bytes |
| Q6_K | 256 weights, 3360 B | 16 fp16 d, [16 sub-blocks of 16][16] int8 scales, 8 x (256 nibble bytes, 2 x 64 bytes: bits 2c, 2c+1 of byte t of group H = high bits of register 4H + c) |

Weight values: Q8_0 d*q; Q4_0 d*(q-8); Q4_1 d*q+m; Q5_0 d*(q-16);
Q4_K (d*sc)*q - (dmin*m); Q6_K (d*sc)*(q-32): exactly what the file holds.
Output rows must be a multiple of 16 (a tensor that is not stays dense).
"""

from __future__ import annotations

import numpy as np
import torch

QTYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}
QNAMES = {v: k for k, v in QTYPES.items()}
PANEL = 16
# (weights per unit, bytes per unit of a 16-row panel)
UNIT = {"Q8_0": (32, 544), "Q4_0": (32, 288), "Q4_1": (32, 320), "Q5_0": (32, 352), "Q4_K": (256, 2368),
        "Q6_K": (256, 3360)}
# GGUF block sizes (weights, bytes) of the types we read
GGUF_BLOCK = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q4_K": (256, 144), "Q6_K": (256, 210)}


def supported(qtype: str, rows: int, k: int) -> bool:
    return qtype in UNIT and k % UNIT[qtype][0] == 0 and rows % PANEL == 0 and rows > 0


def panel_bytes(qtype: str, k: int) -> int:
    n, ub = UNIT[qtype]
    return k // n * ub


def _regs(q: np.ndarray) -> np.ndarray:
    """Values [rows, k] -> registers [P, k/32, 8, 64]: register k byte 4j+i = row 16P+j, weight 32b+4k+i."""
    rows, k = q.shape
    return q.reshape(rows // PANEL, PANEL, k // 32, 8, 4).transpose(0, 2, 3, 1, 4).reshape(rows // PANEL, k // 32, 8, 64)


def _unregs(r: np.ndarray) -> np.ndarray:
    p, nb = r.shape[:2]
    return r.reshape(p, nb, 8, PANEL, 4).transpose(0, 3, 1, 2, 4).reshape(p * PANEL, nb * 32)


def _cols(a: np.ndarray) -> np.ndarray:
    """A per-row field [rows, units, ...] -> [P, units, 16, ...] (the panel's rows side by side)."""
    rows, units = a.shape[:2]
    return a.reshape(rows // PANEL, PANEL, units, *a.shape[2:]).swapaxes(1, 2)


def _uncols(a: np.ndarray) -> np.ndarray:
    p, units = a.shape[:2]
    return a.swapaxes(1, 2).reshape(p * PANEL, units, *a.shape[3:])


def _pack_nib(r: np.ndarray) -> np.ndarray:
    """Registers [..., 8, 64] of values 0..15 -> [..., 256] bytes (group L: register L low, L + 4 high)."""
    return (r[..., :4, :] | (r[..., 4:, :] << 4)).reshape(*r.shape[:-2], 256)


def _unpack_nib(b: np.ndarray) -> np.ndarray:
    b = b.reshape(*b.shape[:-1], 4, 64)
    return np.concatenate([b & 0xF, b >> 4], -2)


def _f16(a: np.ndarray) -> np.ndarray:
    """fp16 bytes [..., 2] -> float32 [...]."""
    return np.ascontiguousarray(a).view(np.float16)[..., 0].astype(np.float32)


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


def _q6k_values(b: np.ndarray) -> np.ndarray:
    """Q6_K blocks [rows, nsb, 210] -> 6-bit values [rows, nsb, 256] in natural order."""
    ql, qh = b[..., :128], b[..., 128:192]
    q = np.empty(b.shape[:2] + (256,), np.uint8)
    for h in range(2):  # two halves of 128 weights
        l_, hh = ql[..., 64 * h:64 * h + 64], qh[..., 32 * h:32 * h + 32]
        base = 128 * h
        q[..., base + 0:base + 32] = (l_[..., :32] & 0xF) | ((hh & 3) << 4)
        q[..., base + 32:base + 64] = (l_[..., 32:] & 0xF) | (((hh >> 2) & 3) << 4)
        q[..., base + 64:base + 96] = (l_[..., :32] >> 4) | (((hh >> 4) & 3) << 4)
        q[..., base + 96:base + 128] = (l_[..., 32:] >> 4) | (((hh >> 6) & 3) << 4)
    return q


def _q8_0_panels(u: np.ndarray, d: np.ndarray) -> np.ndarray:
    """u [rows, k] = q + 128, d [rows, k/32, 2] fp16 bytes -> panels."""
    rows, k = u.shape
    units = np.concatenate([_cols(d).reshape(rows // PANEL, k // 32, 32), _regs(u).reshape(rows // PANEL, k // 32, 512)], -1)
    return units.reshape(rows // PANEL, -1)


def permute_rows(panels: np.ndarray, qtype: str, k: int, order: np.ndarray) -> tuple[np.ndarray, str]:
    """Panels whose row i is row order[i] of `panels`: Q8_0 moved byte for byte (same
    values), other types requantized to Q8_0. Returns (panels, type)."""
    order = np.asarray(order)
    if qtype != "Q8_0":
        w = torch.from_numpy(dequantize(panels, qtype, k)[order])
        return quantize_q8_0(w), "Q8_0"
    P, nb = panels.shape[0], k // 32
    units = np.asarray(panels, np.uint8).reshape(P, nb, 544)
    d = _uncols(units[..., :32].reshape(P, nb, PANEL, 2))  # [rows, nb, 2]
    u = _unregs(units[..., 32:].reshape(P, nb, 8, 64))  # [rows, k]
    return _q8_0_panels(u[order], d[order]), "Q8_0"


def repack_gguf(raw: np.ndarray, qtype: str, rows: int, k: int) -> np.ndarray:
    """GGUF blocks of a [rows, k] tensor (uint8, rows x k/bs*bb bytes) -> panels [rows/16, panel_bytes]."""
    if not supported(qtype, rows, k):
        raise ValueError(f"{qtype} [{rows}, {k}] cannot be stored in panels (rows % 16, K % {UNIT.get(qtype, (32,))[0]})")
    bs, bb = GGUF_BLOCK[qtype]
    b = np.asarray(raw, dtype=np.uint8).reshape(rows, k // bs, bb)
    P, nb = rows // PANEL, k // 32
    if qtype == "Q8_0":
        return _q8_0_panels(b[..., 2:].reshape(rows, k) ^ 0x80, b[..., :2])
    if qtype in ("Q4_0", "Q4_1", "Q5_0"):
        qs = b[..., bb - 16:]
        regs = _regs(np.concatenate([qs & 0xF, qs >> 4], -1).reshape(rows, k))  # [P, nb, 8, 64]
        parts = [_cols(b[..., :2]).reshape(P, nb, 32)]
        if qtype == "Q4_1":
            parts.append(_cols(b[..., 2:4]).reshape(P, nb, 32))
        parts.append(_pack_nib(regs))
        if qtype == "Q5_0":
            qh = b[..., 2:6].copy().view(np.uint32)[..., 0]  # [rows, nb]
            hi = ((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
            parts.append(np.packbits(_regs(hi.reshape(rows, k)), axis=-1, bitorder="little").reshape(P, nb, 64))
        return np.concatenate(parts, -1).reshape(P, -1)
    nsb = k // 256
    if qtype == "Q4_K":
        sc, mn = _k4_scales(b[..., 4:16])
        nib = b[..., 16:].reshape(rows, nsb, 4, 32)  # per 64: low nibbles weights 0-31, high 32-63
        regs = _regs(np.concatenate([nib & 0xF, nib >> 4], -1).reshape(rows, k))
        head = [_cols(b[..., 0:2]).reshape(P, nsb, 32), _cols(b[..., 2:4]).reshape(P, nsb, 32),
                _cols(sc).swapaxes(2, 3).reshape(P, nsb, 128), _cols(mn).swapaxes(2, 3).reshape(P, nsb, 128)]
        return np.concatenate(head + [_pack_nib(regs).reshape(P, nsb, 2048)], -1).reshape(P, -1)
    if qtype == "Q6_K":
        regs = _regs(_q6k_values(b).reshape(rows, k))  # [P, nb, 8, 64]
        hi = (regs >> 4).reshape(P, nb, 2, 4, 64)
        planes = hi[..., 0, :] | (hi[..., 1, :] << 2) | (hi[..., 2, :] << 4) | (hi[..., 3, :] << 6)
        blocks = np.concatenate([_pack_nib(regs & 0xF), planes.reshape(P, nb, 128)], -1).reshape(P, nsb, 3072)
        head = [_cols(b[..., 208:210]).reshape(P, nsb, 32), _cols(b[..., 192:208]).swapaxes(2, 3).reshape(P, nsb, 256)]
        return np.concatenate(head + [blocks], -1).reshape(P, -1)
    raise ValueError(f"unsupported quantized type {qtype}")


def dequantize(data: np.ndarray, qtype: str, k: int) -> np.ndarray:
    """Reference: panels [P, bytes] -> exact fp32 weights [16P, k]."""
    P = data.shape[0]
    n, ub = UNIT[qtype]
    u = np.asarray(data, np.uint8).reshape(P, k // n, ub)
    nb = k // 32
    if qtype in ("Q8_0", "Q4_0", "Q4_1", "Q5_0"):
        d = _uncols(_f16(u[..., :32].reshape(P, nb, PANEL, 2)))  # [rows, nb]
        if qtype == "Q8_0":
            q = u[..., 32:].reshape(P, nb, 8, 64).astype(np.int32) - 128
        else:
            off = 64 if qtype == "Q4_1" else 32
            q = _unpack_nib(u[..., off:off + 256]).astype(np.int32)
            if qtype == "Q5_0":
                q = q + 16 * np.unpackbits(u[..., 288:352].reshape(P, nb, 8, 8), axis=-1, bitorder="little") - 16
            elif qtype == "Q4_0":
                q = q - 8
        w = _unregs(q).reshape(P * PANEL, nb, 32).astype(np.float32) * d[..., None]
        if qtype == "Q4_1":
            w = w + _uncols(_f16(u[..., 32:64].reshape(P, nb, PANEL, 2)))[..., None]
        return w.reshape(P * PANEL, k)
    nsb = k // 256
    d = _uncols(_f16(u[..., :32].reshape(P, nsb, PANEL, 2)))  # [rows, nsb]
    if qtype == "Q4_K":
        dmin = _uncols(_f16(u[..., 32:64].reshape(P, nsb, PANEL, 2)))
        sc = _uncols(u[..., 64:192].reshape(P, nsb, 8, PANEL).swapaxes(2, 3)).astype(np.float32)  # [rows, nsb, 8]
        mn = _uncols(u[..., 192:320].reshape(P, nsb, 8, PANEL).swapaxes(2, 3)).astype(np.float32)
        q = _unregs(_unpack_nib(u[..., 320:].reshape(P, nb, 256))).reshape(P * PANEL, nsb, 8, 32).astype(np.float32)
        return ((d[..., None] * sc)[..., None] * q - (dmin[..., None] * mn)[..., None]).reshape(P * PANEL, k)
    if qtype == "Q6_K":
        sc = _uncols(u[..., 32:288].reshape(P, nsb, 16, PANEL).swapaxes(2, 3).view(np.int8)).astype(np.float32)
        blk = u[..., 288:].reshape(P, nb, 384)
        lo = _unpack_nib(blk[..., :256])  # [P, nb, 8, 64]
        pl = blk[..., 256:].reshape(P, nb, 2, 1, 64)
        hi = ((pl >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3).reshape(P, nb, 8, 64)
        q = (_unregs(lo | (hi << 4)).astype(np.int32) - 32).reshape(P * PANEL, nsb, 16, 16).astype(np.float32)
        return ((d[..., None] * sc)[..., None] * q).reshape(P * PANEL, k)
    raise ValueError(f"unsupported quantized type {qtype}")


def quantize_q8_0(w: torch.Tensor) -> np.ndarray:
    """Float [rows, k] (rows % 16 == 0, k % 32 == 0) -> Q8_0 panels: per 32 weights d = absmax/127
    (fp16), q = round(w/d)."""
    rows, k = w.shape
    if not supported("Q8_0", rows, k):
        raise ValueError(f"q8_0 needs rows % 16 == 0 and K % 32 == 0, got [{rows}, {k}]")
    b = w.detach().float().reshape(rows, k // 32, 32)
    d16 = (b.abs().amax(-1) / 127).to(torch.float16)
    d = d16.float()
    q = torch.where(d[..., None] > 0, torch.round(b / d.clamp(min=torch.finfo(torch.float32).tiny)[..., None]),
                    torch.zeros_like(b)).clamp(-127, 127).to(torch.int8)
    u = q.numpy().view(np.uint8).reshape(rows, k) ^ 0x80
    return _q8_0_panels(u, d16.numpy().view(np.uint8).reshape(rows, k // 32, 2))
