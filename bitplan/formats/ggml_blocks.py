"""ggml's block byte layouts (ggml-common.h's block_q4_0 … block_iq4_xs), packed and unpacked with numpy.

`pack_blocks(name, codes, d, dmin, sc, mn)` takes, for NB blocks: codes [NB, block_size] (code = level − lowest
level, or the IQ4_NL table index), d [NB] and dmin [NB] (fp16 values; dmin is q4_1/q5_1's m), sc / mn [NB, per]
(the sub-block scales and mins of the super-block types, as signed integers: q3_K and iq4_xs in −32…31, q6_K in
−128…127) and returns uint8 [NB, type_size]. `unpack_blocks` inverts it. Multi-byte fields are little-endian.
Element orders, per block of 32 (ggml's `qs` nibble layout): byte l holds element l (low nibble) and l + 16
(high nibble); per 256-weight super-block see each function.
"""
from __future__ import annotations

import numpy as np


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _from_f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32).reshape(-1)


def _nib32(c: np.ndarray) -> np.ndarray:
    """[N, 32] 4-bit values → [N, 16] bytes: element l low nibble, element l + 16 high nibble."""
    c = c.astype(np.uint8)
    return (c[:, :16] & 0xF) | ((c[:, 16:] & 0xF) << 4)


def _unnib32(b: np.ndarray) -> np.ndarray:
    return np.concatenate([b & 0xF, b >> 4], axis=1)


def _bits_le(c: np.ndarray, nbits: int) -> np.ndarray:
    """[N, 8k] bits (0/1) → [N, k] bytes, bit j of byte i = element 8i + j."""
    return np.packbits(c.astype(np.uint8).reshape(c.shape[0], -1, 8), axis=-1, bitorder="little").reshape(c.shape[0], -1)


def _unbits_le(b: np.ndarray) -> np.ndarray:
    return np.unpackbits(b, axis=-1, bitorder="little")


def _k_scales_pack(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """q4_K/q5_K: 8 six-bit scales and mins → 12 bytes (ggml's get_scale_min_k4 layout)."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return out


def _k_scales_unpack(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d, m, md = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = np.concatenate([d & 63, (md & 0xF) | ((d >> 6) << 4)], axis=1)
    mn = np.concatenate([m & 63, (md >> 4) | ((m >> 6) << 4)], axis=1)
    return sc, mn


def _q2_layout(c: np.ndarray) -> np.ndarray:
    """[N, 256] 2-bit values → [N, 64]: element h·128 + s·32 + l at bits 2s of byte h·32 + l."""
    c = c.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)).reshape(-1, 64)


def _q2_unlayout(b: np.ndarray) -> np.ndarray:
    b = b.reshape(-1, 2, 1, 32)
    return ((b >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(-1, 256)


def _q4k_layout(c: np.ndarray) -> np.ndarray:
    """[N, 256] 4-bit values → [N, 128]: element 64c + l low nibble, 64c + 32 + l high nibble of byte 32c + l."""
    c = c.astype(np.uint8).reshape(-1, 4, 2, 32)
    return ((c[:, :, 0] & 0xF) | ((c[:, :, 1] & 0xF) << 4)).reshape(-1, 128)


def _q4k_unlayout(b: np.ndarray) -> np.ndarray:
    b = b.reshape(-1, 4, 1, 32)
    return ((b >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0xF).reshape(-1, 256)


def _hbits(c: np.ndarray, shift: int) -> np.ndarray:
    """[N, 256] → [N, 32]: bit b of byte l = bit `shift` of element 32b + l."""
    h = ((c.astype(np.uint8) >> shift) & 1).reshape(-1, 8, 32)
    return sum((h[:, b] << b) for b in range(8)).astype(np.uint8)


def _unhbits(b: np.ndarray) -> np.ndarray:
    return ((b.reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1).reshape(-1, 256)


def pack_blocks(name: str, codes: np.ndarray, d: np.ndarray, dmin, sc, mn) -> np.ndarray:
    c = codes.astype(np.int64)
    D = _f16(d)
    if name in ("q4_0", "iq4_nl"):
        return np.concatenate([D, _nib32(c)], axis=1)
    if name == "q4_1":
        return np.concatenate([D, _f16(dmin), _nib32(c)], axis=1)
    if name in ("q5_0", "q5_1"):
        qh = _bits_le(c >> 4, 32)
        parts = [D] + ([_f16(dmin)] if name == "q5_1" else []) + [qh, _nib32(c & 0xF)]
        return np.concatenate(parts, axis=1)
    if name == "q8_0":
        return np.concatenate([D, (c - 128).astype(np.int8).view(np.uint8)], axis=1)
    if name == "q2_K":
        scales = (sc.astype(np.uint8) & 0xF) | (mn.astype(np.uint8) << 4)
        return np.concatenate([scales, _q2_layout(c), D, _f16(dmin)], axis=1)
    if name == "q3_K":
        u = (sc + 32).astype(np.uint8)                                 # 16 six-bit scales
        low = (u[:, :8] & 0xF) | ((u[:, 8:] & 0xF) << 4)
        hi = (u >> 4).reshape(-1, 4, 4)                                # [N, s, i]: scale 4s + i
        high = (hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)).astype(np.uint8)
        return np.concatenate([_hbits(c, 2), _q2_layout(c & 3), low, high, D], axis=1)
    if name == "q4_K":
        return np.concatenate([D, _f16(dmin), _k_scales_pack(sc, mn), _q4k_layout(c)], axis=1)
    if name == "q5_K":
        return np.concatenate([D, _f16(dmin), _k_scales_pack(sc, mn), _hbits(c, 4), _q4k_layout(c & 0xF)], axis=1)
    if name == "q6_K":
        c8 = c.astype(np.uint8).reshape(-1, 2, 2, 64)                  # element 128h + 64t + l
        ql = ((c8[:, :, 0] & 0xF) | ((c8[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
        h = (c.astype(np.uint8) >> 4).reshape(-1, 2, 4, 32)            # element 128h + 32s + l
        qh = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(-1, 64)
        return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), D], axis=1)
    if name == "iq4_xs":
        u = (sc + 32).astype(np.uint16)                                # 8 six-bit scales
        sh = sum(((u[:, k] >> 4) & 3) << (2 * k) for k in range(8)).astype(np.uint16)
        sl = ((u[:, 0::2] & 0xF) | ((u[:, 1::2] & 0xF) << 4)).astype(np.uint8)
        qs = _nib32(c.reshape(-1, 32)).reshape(-1, 128)
        return np.concatenate([D, sh.reshape(-1, 1).view(np.uint8), sl, qs], axis=1)
    raise ValueError(name)


def unpack_blocks(name: str, b: np.ndarray):
    """uint8 [NB, type_size] → (codes [NB, block_size] int64, d [NB], dmin [NB] | None, sc, mn)."""
    b = np.ascontiguousarray(b)
    dmin = sc = mn = None
    if name in ("q4_0", "iq4_nl"):
        d, codes = _from_f16(b[:, :2]), _unnib32(b[:, 2:])
    elif name == "q4_1":
        d, dmin, codes = _from_f16(b[:, :2]), _from_f16(b[:, 2:4]), _unnib32(b[:, 4:])
    elif name in ("q5_0", "q5_1"):
        o = 2 if name == "q5_0" else 4
        d = _from_f16(b[:, :2])
        dmin = _from_f16(b[:, 2:4]) if name == "q5_1" else None
        codes = _unnib32(b[:, o + 4:]) | (_unbits_le(b[:, o:o + 4]) << 4)
    elif name == "q8_0":
        d = _from_f16(b[:, :2])
        codes = b[:, 2:].view(np.int8).astype(np.int64) + 128
    elif name == "q2_K":
        scales = b[:, :16]
        sc, mn = scales & 0xF, scales >> 4
        codes = _q2_unlayout(b[:, 16:80])
        d, dmin = _from_f16(b[:, 80:82]), _from_f16(b[:, 82:84])
    elif name == "q3_K":
        hm, qs, low, high, d = b[:, :32], b[:, 32:96], b[:, 96:104], b[:, 104:108], _from_f16(b[:, 108:110])
        codes = _q2_unlayout(qs) | (_unhbits(hm) << 2)
        lo4 = np.concatenate([low & 0xF, low >> 4], axis=1)
        hi2 = ((high.reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)) & 3).reshape(-1, 16)
        sc = (lo4 | (hi2 << 4)).astype(np.int64) - 32
    elif name in ("q4_K", "q5_K"):
        d, dmin = _from_f16(b[:, :2]), _from_f16(b[:, 2:4])
        sc, mn = _k_scales_unpack(b[:, 4:16])
        if name == "q4_K":
            codes = _q4k_unlayout(b[:, 16:])
        else:
            codes = _q4k_unlayout(b[:, 48:]) | (_unhbits(b[:, 16:48]) << 4)
    elif name == "q6_K":
        ql, qh, s8, d = b[:, :128], b[:, 128:192], b[:, 192:208], _from_f16(b[:, 208:210])
        lo = ((ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0xF).reshape(-1, 256)
        hi = ((qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(-1, 256)
        codes = lo | (hi << 4)
        sc = s8.view(np.int8).astype(np.int64)
    elif name == "iq4_xs":
        d = _from_f16(b[:, :2])
        sh = np.ascontiguousarray(b[:, 2:4]).view(np.uint16).reshape(-1, 1)
        sl = b[:, 4:8]
        lo4 = np.stack([sl & 0xF, sl >> 4], axis=2).reshape(-1, 8)
        hi2 = ((sh >> (2 * np.arange(8, dtype=np.uint16)).reshape(1, 8)) & 3).astype(np.uint8)
        sc = (lo4 | (hi2 << 4)).astype(np.int64) - 32
        codes = _unnib32(b[:, 8:].reshape(-1, 16)).reshape(-1, 256)
    else:
        raise ValueError(name)
    as64 = lambda a: None if a is None else a.astype(np.int64)  # noqa: E731
    return codes.astype(np.int64), d, dmin, as64(sc), as64(mn)
