"""`fp16`: passthrough. Codes are the fp16 bit patterns; no scales, no rotation; stored as a plain fp16 tensor."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BitplanError
from .base import FP16_MAX, Format, GroupParams, QuantizedWeight, check_finite, check_matrix


def _check_range(T: torch.Tensor) -> None:
    if T.numel() and float(T.detach().abs().max()) > FP16_MAX:
        raise BitplanError(f"fp16: a value of {float(T.abs().max()):.4g} exceeds the fp16 range (±{FP16_MAX:g})")


@dataclass(frozen=True)
class FP16Format(Format):
    @classmethod
    def make(cls, mse_q: float) -> "FP16Format":
        return cls(
            name="fp16", kind="fp16", nominal_bits=16.0, group_size=0, vector_dim=1, code_bits=16, mse_q=mse_q,
            rotated=False, codebook_bits=0,
        )

    def storage_bits(self, m: int, n: int) -> int:
        if m < 1 or n < 1:
            raise BitplanError(f"layer shape must be positive, got {m}×{n}")
        return 16 * m * n

    def fit(self, W: torch.Tensor, importance: torch.Tensor | None = None) -> GroupParams:
        check_matrix(W)
        _check_range(W)
        return GroupParams(torch.empty(W.shape[0], 0, dtype=torch.float32, device=W.device), None)

    def per_weight(self, params: GroupParams, n: int) -> tuple[torch.Tensor, None]:
        return torch.ones(params.scale.shape[0], n, dtype=torch.float32, device=params.scale.device), None

    def encode(self, T: torch.Tensor, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> torch.Tensor:
        check_finite(T, "fp16: input")
        _check_range(T)
        return T.detach().to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF

    def decode(self, codes: torch.Tensor, scale: torch.Tensor | None = None,
               zero: torch.Tensor | None = None) -> torch.Tensor:
        c = codes.to(torch.int32)
        return torch.where(c >= 1 << 15, c - (1 << 16), c).to(torch.int16).view(torch.float16).to(torch.float32)

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """{"weight": fp16 [m, n]}: passthrough layers stay a plain fp16 tensor in the checkpoint."""
        self._check_qw(qw)
        return {"weight": self.decode(qw.codes).to(torch.float16).contiguous()}

    def unpack(self, tensors: dict[str, torch.Tensor], m: int, n: int) -> QuantizedWeight:
        w = tensors.get("weight")
        if set(tensors) != {"weight"} or w is None or tuple(w.shape) != (m, n) or w.dtype != torch.float16:
            raise BitplanError(f"fp16: packed layer needs one float16 tensor 'weight' of shape [{m}, {n}], "
                               f"got {sorted(tensors)}")
        params = GroupParams(torch.empty(m, 0, dtype=torch.float32), None)
        return QuantizedWeight(self.name, (m, n), self.encode(w), params)
