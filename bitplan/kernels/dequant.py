"""The dequantize routine every kernel shares, the packed-weight record the launchers take, and a dense
dequantize kernel (tests and debugging).

Layout (bitplan/formats/packing.py): row r of `codes` is a little-endian bitstream; code k occupies bits
[k·BITS, (k+1)·BITS). Input column c of a row uses code c // P (entry c % P of that code's grid vector) and
group c // GROUP. Integer formats: w = code·scale + zero; grid formats: w = lut[code, c % P]·scale.
Both are computed in float32 exactly as `Format.decode` does, so a dequantized tile is bit-identical to
bitplan's reference (code·scale is exact in float32, so a fused multiply-add rounds the same way).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from bitplan.errors import BitplanError
from bitplan.formats import Format


@dataclass(frozen=True)
class PackedWeight:
    """One quantized [out, in] layer as the kernels read it, all tensors on one device."""

    codes: torch.Tensor  # int32 [out, words]
    scale: torch.Tensor  # fp16 [out, groups]
    zero: torch.Tensor | None  # fp16 [out, groups], integer formats
    lut: torch.Tensor | None  # float32 [levels, p] contiguous, grid formats
    in_features: int
    bits: int
    p: int
    group: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def is_int(self) -> bool:
        return self.zero is not None

    @classmethod
    def from_format(cls, fmt: Format, tensors: dict[str, torch.Tensor], in_features: int,
                    lut: torch.Tensor | None = None) -> "PackedWeight":
        """From a layer's packed tensors (`fmt.pack`); `lut` overrides `fmt.codebook()` (e.g. a device copy)."""
        if fmt.kind not in ("int", "grid"):
            raise BitplanError(f"the Triton kernels compute int and grid formats, not {fmt.name}; use a dense matmul")
        codes = tensors["codes"]
        if fmt.kind == "grid" and lut is None:
            lut = fmt.codebook().to(codes.device)
        w = cls(codes=codes, scale=tensors["scale"], zero=tensors.get("zero") if fmt.kind == "int" else None,
                lut=lut.contiguous() if fmt.kind == "grid" else None, in_features=in_features,
                bits=fmt.code_bits, p=fmt.vector_dim, group=fmt.group_size)
        w.check()
        return w

    def check(self) -> None:
        m, n = self.out_features, self.in_features
        words = math.ceil(math.ceil(n / self.p) * self.bits / 32)
        groups = math.ceil(n / self.group)
        if self.codes.dtype != torch.int32 or tuple(self.codes.shape) != (m, words):
            raise BitplanError(f"packed codes should be int32 [{m}, {words}] for {self.bits}-bit codes of a {m}×{n} layer, got {self.codes.dtype} {tuple(self.codes.shape)}")
        for name, t in (("scale", self.scale), ("zero", self.zero)):
            if t is not None and (t.dtype != torch.float16 or tuple(t.shape) != (m, groups)):
                raise BitplanError(f"packed {name} should be float16 [{m}, {groups}], got {t.dtype} {tuple(t.shape)}")
        if self.zero is None and (self.lut is None or tuple(self.lut.shape) != (1 << self.bits, self.p) or self.lut.dtype != torch.float32):
            raise BitplanError(f"a grid format needs a float32 [{1 << self.bits}, {self.p}] lookup table")
        if self.codes.numel() >= 2**31 or self.scale.numel() >= 2**31:
            raise BitplanError(f"a {m}×{n} layer is too large for the kernels' 32-bit offsets; split it")
        devices = {t.device for t in (self.codes, self.scale, self.zero, self.lut) if t is not None}
        if len(devices) != 1:
            raise BitplanError(f"packed tensors are on several devices: {sorted(map(str, devices))}")
        if any(not t.is_contiguous() for t in (self.codes, self.scale, self.zero, self.lut) if t is not None):
            raise BitplanError("packed tensors must be contiguous")

    def kernel_args(self) -> tuple:
        """Pointer arguments in kernel order; an unused zero/lut is replaced by scale (never read)."""
        return (self.codes, self.scale, self.zero if self.zero is not None else self.scale,
                self.lut if self.lut is not None else self.scale)


@triton.jit
def load_codes(codes_ptr, rows, cols, mask, stride_code, BITS: tl.constexpr, P: tl.constexpr):
    """Codes [R, C] (int32) used by input columns `cols` [C] of output rows `rows` [R].

    Offsets are int32 (PackedWeight.check bounds the tensors): 64-bit index math per weight costs registers
    the tiles need."""
    idx = cols // P
    row_ptr = codes_ptr + rows[:, None] * stride_code
    if 32 % BITS == 0:
        # Fields never straddle a word: one int32 load (same address for 32/BITS neighbours) and a shift.
        word = tl.load(row_ptr + (idx // (32 // BITS))[None, :], mask=mask, other=0)
        code = (word >> ((idx % (32 // BITS)) * BITS)[None, :]) & ((1 << BITS) - 1)
    else:
        # A field may continue in the next word: unsigned 32-bit halves, the low part shifted down and the
        # high part up by 32 − shift (in 1 .. BITS − 1 exactly when the field spills; & 31 keeps the unused
        # shift defined when it does not, where hi is 0).
        bit = idx * BITS
        word = bit // 32
        shift = (bit % 32).to(tl.uint32)
        spill = shift > 32 - BITS
        lo = tl.load(row_ptr + word[None, :], mask=mask, other=0).to(tl.uint32)
        hi = tl.load(row_ptr + (word + 1)[None, :], mask=mask & spill[None, :], other=0).to(tl.uint32)
        code = ((lo >> shift[None, :]) | (hi << ((32 - shift) & 31)[None, :])) & ((1 << BITS) - 1)
    return code.to(tl.int32)


@triton.jit
def dequantize_tile(codes_ptr, scale_ptr, zero_ptr, lut_ptr, rows, row_ok, k0, col_ok, stride_code, stride_group,
                    BITS: tl.constexpr, P: tl.constexpr, GROUP: tl.constexpr, IS_INT: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """Weights [R, BLOCK_K] (float32) of output rows `rows` and input columns k0 .. k0 + BLOCK_K − 1, k0 a
    multiple of BLOCK_K. Entries outside row_ok × col_ok are finite but arbitrary: callers multiply them by
    zeroed activations or mask their store."""
    cols = k0 + tl.arange(0, BLOCK_K)
    mask = row_ok[:, None] & col_ok[None, :]
    code = load_codes(codes_ptr, rows, cols, mask, stride_code, BITS, P)
    if GROUP % BLOCK_K == 0:
        # The tile lies inside one group: one scale (and zero) per row instead of a gather per weight, which
        # saves registers and load instructions.
        at = rows * stride_group + k0 // GROUP
        scale = tl.load(scale_ptr + at, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        if IS_INT:
            zero = tl.load(zero_ptr + at, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    else:
        at = rows[:, None] * stride_group + (cols // GROUP)[None, :]
        scale = tl.load(scale_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if IS_INT:
            zero = tl.load(zero_ptr + at, mask=mask, other=0.0).to(tl.float32)
    if IS_INT:
        w = code.to(tl.float32) * scale + zero
    else:
        # Masked entries read code 0, a valid row of the table.
        w = tl.load(lut_ptr + code * P + (cols % P)[None, :]) * scale
    return w


@triton.jit
def _dequantize_kernel(codes_ptr, scale_ptr, zero_ptr, lut_ptr, out_ptr, N, K, stride_code, stride_group,
                       BITS: tl.constexpr, P: tl.constexpr, GROUP: tl.constexpr, IS_INT: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    w = dequantize_tile(codes_ptr, scale_ptr, zero_ptr, lut_ptr, rows, rows < N, k0, cols < K, stride_code,
                        stride_group, BITS, P, GROUP, IS_INT, BLOCK_K)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], w, mask=mask)


def dequantize(w: PackedWeight, block_n: int = 32, block_k: int = 64) -> torch.Tensor:
    """The dense float32 weight [out, in] of a packed layer."""
    N, K = w.out_features, w.in_features
    out = torch.empty(N, K, dtype=torch.float32, device=w.codes.device)
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    _dequantize_kernel[grid](*w.kernel_args(), out, N, K, w.codes.stride(0), w.scale.stride(0),
                             BITS=w.bits, P=w.p, GROUP=w.group, IS_INT=w.is_int, BLOCK_N=block_n, BLOCK_K=block_k)
    return out



# Whether this process's kernels were decorated for Triton's interpreter (TRITON_INTERPRET=1 at import): they
# then run on CPU tensors (slowly) and launchers use one fixed config instead of benchmarking a set. Fixed at
# import, as the decoration is; a plain constant also keeps torch.compile from tracing into triton's knobs.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)
