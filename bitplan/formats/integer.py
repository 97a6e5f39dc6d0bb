"""Asymmetric integer group formats `int{b}-g{g}`: x̂ = code · scale + zero, code ∈ [0, 2^b − 1].

Per group of g entries along the input dimension: zero = the group minimum rounded *down* to fp16, scale =
(max − zero) / (2^b − 1) rounded *up* to fp16 (one more fp16 step if that still falls short), so the grid
[zero, zero + (2^b − 1)·scale] covers the whole group and no entry is clamped: the error of every weight is at
most half a step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BitplanError
from .base import Format, GroupParams, check_finite, check_matrix, to_fp16_values


@dataclass(frozen=True)
class IntFormat(Format):
    @classmethod
    def make(cls, b: int, g: int, mse_q: float) -> "IntFormat":
        return cls(
            name=f"int{b}-g{g}", kind="int", nominal_bits=float(b), group_size=g, vector_dim=1, code_bits=b,
            mse_q=mse_q, rotated=True, codebook_bits=0,
        )

    @property
    def has_zero(self) -> bool:
        return True

    @property
    def qmax(self) -> int:
        return (1 << self.code_bits) - 1

    def fit(self, W: torch.Tensor, importance: torch.Tensor | None = None) -> GroupParams:
        check_matrix(W)
        m, n = W.shape
        g = self.group_size
        G = math.ceil(n / g)
        W64 = W.detach().to(torch.float64)
        if G * g != n:  # pad the tail group with its own first entry: min and max unchanged
            W64 = torch.cat([W64, W64[:, (G - 1) * g:(G - 1) * g + 1].expand(m, G * g - n)], dim=1)
        groups = W64.reshape(m, G, g)
        lo, hi = groups.amin(-1), groups.amax(-1)
        zero = to_fp16_values(lo, "group minimum (zero point)", mode="down").to(torch.float64)
        scale = to_fp16_values((hi - zero) / self.qmax, "group step (scale)", mode="up").to(torch.float64)
        short = zero + self.qmax * scale < hi  # float rounding in the division: one fp16 step more
        if bool(short.any()):
            s16 = scale.numpy().astype(np.float16)
            bumped = torch.from_numpy(np.nextafter(s16, np.float16(np.inf)).astype(np.float64))
            scale = torch.where(short, bumped, scale)
            if bool((zero + self.qmax * scale < hi).any()) or not bool(torch.isfinite(scale).all()):
                raise BitplanError(f"{self.name}: a group's range does not fit fp16 scale and zero; "
                                   "scale the weights down first")
        return GroupParams(scale.to(torch.float32).to(W.device), zero.to(torch.float32).to(W.device))

    def _check(self, T: torch.Tensor, scale, zero, what: str) -> None:
        if scale is None or zero is None:
            raise BitplanError(f"{self.name}: {what} needs per-weight scale and zero (see per_weight)")
        if tuple(scale.shape) != tuple(T.shape) or tuple(zero.shape) != tuple(T.shape):
            raise BitplanError(f"{self.name}: {what} needs scale and zero of shape {tuple(T.shape)}, "
                               f"got {tuple(scale.shape)} and {tuple(zero.shape)}")

    def encode(self, T: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None = None) -> torch.Tensor:
        self._check(T, scale, zero, "encode")
        check_finite(T, f"{self.name}: input")
        s = scale.detach().to(torch.float64)
        q = (T.detach().to(torch.float64) - zero.to(torch.float64)) / torch.where(s == 0, 1.0, s)
        q = torch.where(s == 0, 0.0, q)
        return torch.round(q).clamp_(0, self.qmax).to(torch.int32)

    def decode(self, codes: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None = None) -> torch.Tensor:
        self._check(codes, scale, zero, "decode")
        # code·scale is exact in float32 (≤ 8 + 11 significant bits); one rounding in the add
        return codes.to(torch.float32) * scale.to(torch.float32) + zero.to(torch.float32)
