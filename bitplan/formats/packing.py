"""Bit packing of b-bit codes into int32 words, one little-endian bitstream per row.

Element k of a row occupies bits [k·b, (k+1)·b) of the row's stream; bit j of the stream is bit j % 32 of
word j // 32. Fields may straddle two words. A row of K codes takes ceil(K·b/32) words; the unused high bits
of the last word are zero. This is the layout the Triton kernels read.
"""
from __future__ import annotations

import math

import torch

from ..errors import BitplanError

_ROWS_PER_CHUNK_ELEMS = 1 << 22  # bounds the int64 temporaries to a few tens of MB


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise BitplanError(f"code width must be an integer from 1 to 16 bits, got {bits!r}")
    return bits


def packed_words(K: int, bits: int) -> int:
    return math.ceil(K * _check_bits(bits) / 32)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [rows, K] (integers in [0, 2^bits)) → int32 [rows, ceil(K·bits/32)]."""
    _check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise BitplanError(f"pack_bits expects a 2-D [rows, K] tensor of codes, got {getattr(codes, 'shape', type(codes))}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise BitplanError(f"pack_bits expects integer codes, got {codes.dtype}")
    rows, K = codes.shape
    W = packed_words(K, bits)
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= 1 << bits:
            raise BitplanError(f"codes out of range for {bits}-bit packing: min {lo}, max {hi}, "
                               f"allowed 0..{(1 << bits) - 1}")
    out = torch.zeros(rows, W, dtype=torch.int32)
    if K == 0 or rows == 0:
        return out
    offset = torch.arange(K, dtype=torch.int64) * bits
    word, shift = offset // 32, offset % 32
    spill = (shift + bits) > 32  # fields that continue in the next word
    step = max(1, _ROWS_PER_CHUNK_ELEMS // K)
    for r in range(0, rows, step):
        c = codes[r:r + step].to("cpu", torch.int64)
        acc = torch.zeros(c.shape[0], W + 1, dtype=torch.int64)
        acc.scatter_add_(1, word.expand_as(c), (c << shift) & 0xFFFFFFFF)  # disjoint bit fields: sum == or
        acc.scatter_add_(1, (word + 1).expand_as(c), torch.where(spill, c >> (32 - shift), 0))
        acc = acc[:, :W]
        out[r:r + step] = torch.where(acc >= 1 << 31, acc - (1 << 32), acc).to(torch.int32)
    return out


def unpack_bits(words: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """int32 [rows, ceil(K·bits/32)] → codes int32 [rows, K]; the inverse of pack_bits."""
    _check_bits(bits)
    if not isinstance(words, torch.Tensor) or words.dim() != 2 or words.dtype != torch.int32:
        got = f"{getattr(words, 'dtype', type(words))} {tuple(getattr(words, 'shape', ()))}"
        raise BitplanError(f"unpack_bits expects a 2-D int32 tensor, got {got}")
    if not isinstance(K, int) or K < 0:
        raise BitplanError(f"number of codes per row must be a non-negative integer, got {K!r}")
    rows, W = words.shape
    if W != packed_words(K, bits):
        raise BitplanError(f"{K} codes of {bits} bits need {packed_words(K, bits)} words per row, got {W}")
    out = torch.empty(rows, K, dtype=torch.int32)
    if K == 0 or rows == 0:
        return out
    offset = torch.arange(K, dtype=torch.int64) * bits
    word, shift = offset // 32, offset % 32
    nxt = torch.clamp(word + 1, max=W - 1)
    spill = (shift + bits) > 32
    mask = (1 << bits) - 1
    step = max(1, _ROWS_PER_CHUNK_ELEMS // K)
    for r in range(0, rows, step):
        w = words[r:r + step].to("cpu", torch.int64) & 0xFFFFFFFF  # as unsigned 32-bit
        low = w[:, word] >> shift
        high = torch.where(spill, w[:, nxt] << (32 - shift), 0)
        out[r:r + step] = ((low | high) & mask).to(torch.int32)
    return out
