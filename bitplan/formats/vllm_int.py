"""Integer group formats vLLM runs (compressed-tensors `pack-quantized`, GPTQ style), unrotated.

`sint{b}-g{g}`, symmetric: x̂ = q·scale, q ∈ [−2^(b−1), 2^(b−1) − 1], one fp16 scale per group. Fit: scale =
max(max⁺ / (2^(b−1) − 1), |min⁻| / 2^(b−1)) rounded up to fp16 (one fp16 step more where the float64 quotient fell
short), so [−2^(b−1)·scale, (2^(b−1) − 1)·scale] covers the group and no entry is clamped. A zero group has scale 0
and q = 0. Codes are stored offset by 2^(b−1) (u = q + 2^(b−1) ∈ [0, 2^b − 1]), as compressed-tensors packs them.

`uint{b}-g{g}`, asymmetric with an integer zero point: x̂ = (q − z)·scale, q ∈ [0, 2^b − 1], z ∈ [0, 2^b − 1]
(stored as uint8), fp16 scale. The represented range always holds 0, so the fit works on lo = min(min, 0) and
hi = max(max, 0). Fit: scale = (hi − lo) / (2^b − 1) rounded up to fp16, z = round(−lo / scale) clamped; then
where round(lo/scale) + z < 0 or round(hi/scale) + z > 2^b − 1 (z's own rounding can push the top code one past
the end when both ends sit on half steps), scale is widened one fp16 step and z recomputed, until nothing clamps.

In both, every weight's error is at most half a step, and decode computes exactly what compressed-tensors does:
(q − z)·scale is exact in float32 (≤ 9 + 11 significant bits). Neither is rotated: vLLM cannot run per-layer
random rotations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BitplanError
from .base import FP16_MAX, Format, GroupParams, QuantizedWeight, check_finite, check_matrix, to_fp16_values
from .packing import pack_bits, unpack_bits

_MAX_WIDEN = 4  # fp16 steps a fit may widen a scale by; one always suffices in exact arithmetic


def _group_extremes(W: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max [m, G] in float64; the tail group padded with its own first entry."""
    m, n = W.shape
    G = math.ceil(n / g)
    W64 = W.detach().to(torch.float64)
    if G * g != n:
        W64 = torch.cat([W64, W64[:, (G - 1) * g:(G - 1) * g + 1].expand(m, G * g - n)], dim=1)
    groups = W64.reshape(m, G, g)
    return groups.amin(-1), groups.amax(-1)


def _next_fp16(x: torch.Tensor) -> torch.Tensor:
    h = x.cpu().numpy().astype(np.float16)
    return torch.from_numpy(np.nextafter(h, np.float16(np.inf)).astype(np.float64))


def _round_codes(T: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(T / scale) in float64, 0 where scale is 0."""
    s = scale.detach().to(torch.float64)
    q = T.detach().to(torch.float64) / torch.where(s == 0, 1.0, s)
    return torch.round(torch.where(s == 0, 0.0, q))


@dataclass(frozen=True)
class _VllmInt(Format):
    KIND = ""   # "sint" or "uint": the name's prefix and the format's kind

    @classmethod
    def make(cls, b: int, g: int, mse_q: float) -> "_VllmInt":
        return cls(name=f"{cls.KIND}{b}-g{g}", kind=cls.KIND, nominal_bits=float(b), group_size=g, vector_dim=1,
                   code_bits=b, mse_q=mse_q, rotated=False, codebook_bits=0)

    def _check(self, T: torch.Tensor, scale, zero, what: str) -> None:
        need_zero = self.has_zero
        if scale is None or (need_zero and zero is None):
            raise BitplanError(f"{self.name}: {what} needs per-weight scale{' and zero' if need_zero else ''} "
                               "(see per_weight)")
        for t in (scale, zero) if need_zero else (scale,):
            if tuple(t.shape) != tuple(T.shape):
                raise BitplanError(f"{self.name}: {what} needs per-weight parameters of shape {tuple(T.shape)}, "
                                   f"got {tuple(t.shape)}")


@dataclass(frozen=True)
class SymIntFormat(_VllmInt):
    KIND = "sint"

    @property
    def offset(self) -> int:
        return 1 << (self.code_bits - 1)

    def fit(self, W: torch.Tensor, importance: torch.Tensor | None = None) -> GroupParams:
        check_matrix(W)
        lo, hi = _group_extremes(W, self.group_size)
        qpos, qneg = self.offset - 1, self.offset
        # b = 2 has one positive level; max⁺/1 and |min⁻|/2 still make both ends fit
        need = torch.maximum(hi.clamp_min(0) / qpos, (-lo).clamp_min(0) / qneg)
        scale = to_fp16_values(need, "group step (scale)", mode="up").to(torch.float64)
        short = (qpos * scale < hi) | (qneg * scale < -lo)
        if bool(short.any()):
            scale = torch.where(short, _next_fp16(scale), scale)
            if bool(((qpos * scale < hi) | (qneg * scale < -lo)).any()) or not bool(torch.isfinite(scale).all()):
                raise BitplanError(f"{self.name}: a group's range does not fit an fp16 scale; scale the weights down")
        return GroupParams(scale.to(torch.float32).to(W.device), None)

    def encode(self, T: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None = None) -> torch.Tensor:
        self._check(T, scale, zero, "encode")
        check_finite(T, f"{self.name}: input")
        q = _round_codes(T, scale).clamp_(-self.offset, self.offset - 1)
        return (q + self.offset).to(torch.int32)

    def decode(self, codes: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None = None) -> torch.Tensor:
        self._check(codes, scale, zero, "decode")
        return (codes.to(torch.int32) - self.offset).to(torch.float32) * scale.to(torch.float32)


@dataclass(frozen=True)
class ZeroPointIntFormat(_VllmInt):
    KIND = "uint"

    @property
    def has_zero(self) -> bool:
        return True

    @property
    def qmax(self) -> int:
        return (1 << self.code_bits) - 1

    def storage_bits(self, m: int, n: int) -> int:
        """Codes in int32 words per row, an fp16 scale and a uint8 zero point per group."""
        if m < 1 or n < 1:
            raise BitplanError(f"layer shape must be positive, got {m}×{n}")
        return m * self.code_words(n) * 32 + m * self.num_groups(n) * (16 + 8)

    def _zero_for(self, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        s = torch.where(scale == 0, 1.0, scale)
        return torch.where(scale == 0, 0.0, torch.round(-lo / s)).clamp(0, self.qmax)

    def fit(self, W: torch.Tensor, importance: torch.Tensor | None = None) -> GroupParams:
        check_matrix(W)
        lo, hi = _group_extremes(W, self.group_size)
        lo, hi = lo.clamp_max(0), hi.clamp_min(0)
        scale = to_fp16_values((hi - lo) / self.qmax, "group step (scale)", mode="up").to(torch.float64)
        for _ in range(_MAX_WIDEN + 1):
            zero = self._zero_for(lo, scale)
            bad = (_round_codes(lo, scale) + zero < 0) | (_round_codes(hi, scale) + zero > self.qmax)
            if not bool(bad.any()):
                break
            scale = torch.where(bad, _next_fp16(scale), scale)
        else:
            raise BitplanError(f"{self.name}: a group's range does not fit an fp16 scale; scale the weights down")
        if not bool(torch.isfinite(scale).all()) or bool((scale > FP16_MAX).any()):
            raise BitplanError(f"{self.name}: a group's range does not fit an fp16 scale; scale the weights down")
        return GroupParams(scale.to(torch.float32).to(W.device), zero.to(torch.float32).to(W.device))

    def encode(self, T: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None = None) -> torch.Tensor:
        self._check(T, scale, zero, "encode")
        check_finite(T, f"{self.name}: input")
        q = _round_codes(T, scale) + zero.to(torch.float64)
        return q.clamp_(0, self.qmax).to(torch.int32)

    def decode(self, codes: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None = None) -> torch.Tensor:
        self._check(codes, scale, zero, "decode")
        return (codes.to(torch.int32) - zero.to(torch.int32)).to(torch.float32) * scale.to(torch.float32)

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """`codes` (int32 words), `scale` (fp16) and `zero` (uint8: the integer zero point)."""
        self._check_qw(qw)
        return {"codes": pack_bits(qw.codes, self.code_bits), "scale": qw.params.scale.to(torch.float16).contiguous(),
                "zero": qw.params.zero.to(torch.uint8).contiguous()}

    def unpack(self, tensors: dict[str, torch.Tensor], m: int, n: int) -> QuantizedWeight:
        if set(tensors) != {"codes", "scale", "zero"}:
            raise BitplanError(f"{self.name}: packed layer needs tensors ['codes', 'scale', 'zero'], got {sorted(tensors)}")
        G = self.num_groups(n)
        codes, scale, zero = tensors["codes"], tensors["scale"], tensors["zero"]
        if tuple(codes.shape) != (m, self.code_words(n)) or codes.dtype != torch.int32:
            raise BitplanError(f"{self.name}: packed codes should be int32 [{m}, {self.code_words(n)}] for a {m}×{n} "
                               f"layer, got {codes.dtype} {tuple(codes.shape)}")
        for key, t, dtype in (("scale", scale, torch.float16), ("zero", zero, torch.uint8)):
            if tuple(t.shape) != (m, G) or t.dtype != dtype:
                raise BitplanError(f"{self.name}: packed {key} should be {str(dtype).removeprefix('torch.')} [{m}, {G}],"
                                   f" got {t.dtype} {tuple(t.shape)}")
        if zero.numel() and int(zero.max()) > self.qmax:
            raise BitplanError(f"{self.name}: a packed zero point exceeds {self.qmax}; the checkpoint is damaged")
        params = GroupParams(scale.to(torch.float32), zero.to(torch.float32))
        return QuantizedWeight(self.name, (m, n), unpack_bits(codes, self.code_bits, n), params)
