"""Randomized Hadamard rotations in Triton: y = R x or Rᵀ x along the last dim, equal to
`bitplan.formats.RandomizedHadamard.forward` / `.inverse`.

R = H·S with H = (Had_K ⊗ Had_B) / √(K·B) (bitplan/formats/hadamard.py `plan(n)`; block-diagonal plans are
n/B copies of Had_B). The Sylvester part Had_B runs as one kernel over chunks of up to CHUNK entries, with
the sign flips and the normalization folded in; Sylvester entries (−1)^popcount(i & j) are computed in
registers, never loaded:

- chunks of N ≤ 64: a tile of rows times the [N, N] matrix (one tl.dot, N padded to 16);
- chunks of 128 ≤ N ≤ 4096: each row as an [N1, N2] matrix X, Had_N X = Had_N1 · X · Had_N2 (two tl.dots,
  since Had_{N1·N2} = Had_N1 ⊗ Had_N2; N1 = 8 is padded to 16);
- B > CHUNK (e.g. 8192): the chunk kernel, then Had_{B/CHUNK} across chunks (`_mix_kernel`, Sylvester entries).

The dense Had_K (Paley, e.g. K = 12, 28, 344) is applied by `_mix_kernel` along the K axis of [rows, K, B],
reading the ±1 matrix from memory. All arithmetic is float32 with IEEE dots (the ±1 entries are exact).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from bitplan.errors import BitplanError
from bitplan.formats import RandomizedHadamard
from bitplan.formats.hadamard import hadamard_matrix

CHUNK = 4096  # longest Sylvester block done in registers by one program
_SPLIT_FROM = 128  # from here on a chunk is an N1 × N2 matrix (N2 ≥ 16, N1 padded to 16 for tl.dot)
_SIGNS_BEFORE, _SIGNS_AFTER = 1, 2  # where the chunk kernel applies the sign flips


@triton.jit
def _sylvester(i, j):
    """Entries of the unnormalized Sylvester matrix: (−1)^popcount(i & j), for indices below 2^16."""
    v = i & j
    v = v ^ (v >> 8)
    v = v ^ (v >> 4)
    v = v ^ (v >> 2)
    v = v ^ (v >> 1)
    return 1.0 - 2.0 * (v & 1).to(tl.float32)


@triton.jit
def _fwht_kernel(x_ptr, y_ptr, signs_ptr, R, PERIOD, scale, N: tl.constexpr, SPLIT: tl.constexpr,
                 NP: tl.constexpr, ROWS: tl.constexpr, N1: tl.constexpr, N1P: tl.constexpr, N2: tl.constexpr,
                 SIGNS: tl.constexpr):
    """Rows of length N (R of them, contiguous) ↦ scale · Had_N (signs ⊙ row) (or signs after).
    Row r starts at position (r % PERIOD)·N of its length-(PERIOD·N) vector, which indexes the signs."""
    if not SPLIT:  # short chunks: a [ROWS, NP] tile times Had (symmetric), padded to NP ≥ 16
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, NP)
        mask = (rows < R)[:, None] & (cols < N)[None, :]
        at = rows[:, None].to(tl.int64) * N + cols[None, :]
        s_at = (rows % PERIOD)[:, None] * N + cols[None, :]
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if SIGNS == 1:
            x = x * tl.load(signs_ptr + s_at, mask=mask, other=0.0)
        h = tl.where((cols < N)[:, None] & (cols < N)[None, :], _sylvester(cols[:, None], cols[None, :]), 0.0)
        y = tl.dot(x, h, input_precision="ieee") * scale
    else:  # one row per program as an [N1, N2] matrix (N1 padded to N1P ≥ 16): Had_N1 · X · Had_N2
        r = tl.program_id(0)
        i1 = tl.arange(0, N1P)
        i2 = tl.arange(0, N2)
        mask = (i1 < N1)[:, None] & (i2 < N2)[None, :]
        pos = i1[:, None] * N2 + i2[None, :]
        at = r.to(tl.int64) * N + pos
        s_at = (r % PERIOD) * N + pos
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if SIGNS == 1:
            x = x * tl.load(signs_ptr + s_at, mask=mask, other=0.0)
        x = tl.dot(x, _sylvester(i2[:, None], i2[None, :]), input_precision="ieee")
        h1 = tl.where((i1 < N1)[:, None] & (i1 < N1)[None, :], _sylvester(i1[:, None], i1[None, :]), 0.0)
        y = tl.dot(h1, x, input_precision="ieee") * scale
    if SIGNS == 2:
        y = y * tl.load(signs_ptr + s_at, mask=mask, other=0.0)
    tl.store(y_ptr + at, y, mask=mask)


@triton.jit
def _mix_kernel(x_ptr, h_ptr, y_ptr, A, C, stride_hi, stride_hj, SYLVESTER: tl.constexpr, BLOCK_I: tl.constexpr,
                BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    """x [B, A, C] ↦ y[b] = H · x[b], H [A, A] read with strides (a transpose is a stride swap), or the
    Sylvester matrix when SYLVESTER."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    base = b * A * C
    acc = tl.zeros((BLOCK_I, BLOCK_C), dtype=tl.float32)
    for j0 in range(0, A, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        h_mask = (i < A)[:, None] & (j < A)[None, :]
        if SYLVESTER:
            h = tl.where(h_mask, _sylvester(i[:, None], j[None, :]), 0.0)
        else:
            h = tl.load(h_ptr + i[:, None] * stride_hi + j[None, :] * stride_hj, mask=h_mask, other=0.0)
        x = tl.load(x_ptr + base + j[:, None] * C + c[None, :], mask=(j < A)[:, None] & (c < C)[None, :], other=0.0)
        acc = tl.dot(h, x.to(tl.float32), acc, input_precision="ieee")
    tl.store(y_ptr + base + i[:, None] * C + c[None, :], acc, mask=(i < A)[:, None] & (c < C)[None, :])


def _fwht(x: torch.Tensor, out: torch.Tensor, signs: torch.Tensor, N: int, scale: float, where: int) -> None:
    """Chunks of length N of the contiguous x (rows of n = numel / rows entries) into out."""
    n = signs.numel()
    R = x.numel() // N
    if N < _SPLIT_FROM:
        NP = max(16, N)
        rows = max(16, 2048 // NP)
        _fwht_kernel[(triton.cdiv(R, rows),)](x, out, signs, R, n // N, scale, N=N, SPLIT=False, NP=NP, ROWS=rows,
                                              N1=1, N1P=1, N2=1, SIGNS=where, num_warps=4)
    else:
        N2 = 1 << (N.bit_length() // 2)  # N = 2^k: N2 = 2^ceil(k/2) ≥ 16, N1 = N / N2 ≤ N2
        N1 = N // N2
        _fwht_kernel[(R,)](x, out, signs, R, n // N, scale, N=N, SPLIT=True, NP=1, ROWS=1, N1=N1, N1P=max(16, N1),
                           N2=N2, SIGNS=where, num_warps=4 if N <= 1024 else 8 if N <= 2048 else 16)


def _mix(x: torch.Tensor, out: torch.Tensor, A: int, C: int, h: torch.Tensor | None) -> None:
    """out[b] = H · x[b] for x viewed as [B, A, C]; H = h (any strides) or Sylvester(A) when h is None."""
    B = x.numel() // (A * C)
    bi = 16 if A <= 16 else 32
    bc = max(16, min(64, triton.next_power_of_2(C)))
    grid = (B, triton.cdiv(A, bi), triton.cdiv(C, bc))
    hs = (h.stride(0), h.stride(1)) if h is not None else (0, 0)
    _mix_kernel[grid](x, h if h is not None else x, out, A, C, *hs, SYLVESTER=h is None, BLOCK_I=bi, BLOCK_J=bi,
                      BLOCK_C=bc)


@dataclass(frozen=True, eq=False)
class DeviceRotation:
    """What the kernels need of one RandomizedHadamard, on one device."""

    n: int
    block: int  # the Sylvester part B
    signs: torch.Tensor  # float32 [n]
    dense: torch.Tensor | None  # float32 [K, K] unnormalized Had_K (Kronecker plans)

    @property
    def K(self) -> int:
        return self.dense.shape[0] if self.dense is not None else 1


_DEVICE_COPIES: "weakref.WeakKeyDictionary[RandomizedHadamard, dict]" = weakref.WeakKeyDictionary()


def device_rotation(had: RandomizedHadamard, device: torch.device | str) -> DeviceRotation:
    """The device tensors of `had`, built once per device and kept as long as `had` lives."""
    device = torch.device(device)
    per_device = _DEVICE_COPIES.setdefault(had, {})
    if device not in per_device:
        dense = hadamard_matrix(had.plan.K).to(device, torch.float32) if had.plan.kind == "kronecker" else None
        per_device[device] = DeviceRotation(had.n, had.plan.block, had.signs.to(device, torch.float32), dense)
    return per_device[device]


def rotate(x: torch.Tensor, rot: DeviceRotation, inverse: bool = False) -> torch.Tensor:
    """R x (`had.forward(x)`) or Rᵀ x (`had.inverse(x)`) along the last dim, in x's dtype (float32 inside)."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise BitplanError(f"the Triton Hadamard transform takes float16, bfloat16 or float32, not {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != rot.n:
        raise BitplanError(f"rotation of size {rot.n} applied to a last dim of size {x.shape[-1] if x.dim() else 0}")
    src = x.contiguous()
    if src.numel() == 0:
        return x.clone()
    K = rot.K
    N = min(rot.block, CHUNK)
    chunks = rot.block // N  # > 1 only for Sylvester blocks longer than CHUNK
    scale = 1.0 / math.sqrt(K * rot.block)
    steps = []  # (kind, argument) in order; the chunk kernel carries the signs and the scale
    if inverse:
        if rot.dense is not None:
            steps.append(("mix", (K, rot.block, rot.dense.T)))
        if chunks > 1:
            steps.append(("mix", (chunks, N, None)))
        steps.append(("fwht", _SIGNS_AFTER))
    else:
        steps.append(("fwht", _SIGNS_BEFORE))
        if chunks > 1:
            steps.append(("mix", (chunks, N, None)))
        if rot.dense is not None:
            steps.append(("mix", (K, rot.block, rot.dense)))
    cur = src
    for idx, (kind, arg) in enumerate(steps):
        last = idx == len(steps) - 1
        out = torch.empty(src.shape, dtype=x.dtype if last else torch.float32, device=x.device)
        if kind == "fwht":
            _fwht(cur, out, rot.signs, N, scale, arg)
        else:
            _mix(cur, out, *arg)
        cur = out
    return cur
