"""torch.library custom ops over the kernels, so `torch.compile` treats them as opaque nodes with known shapes:

    bitplan::qmatmul(x, codes, scale, zero, lut, in_features, bits, p, group, acc_fp16)  -> x Wᵀ
    bitplan::hadamard(x, signs, dense, block, inverse)                                   -> R x or Rᵀ x

and `matmul`, the batch-size dispatch behind qmatmul: one row → GEMV, more → GEMM (split-K up to
gemm.SPLIT_K_MAX_M rows).
"""
from __future__ import annotations

import torch

from bitplan.errors import BitplanError

from .dequant import PackedWeight
from .gemm import gemm
from .gemv import gemv
from .hadamard import DeviceRotation, rotate

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def matmul(x: torch.Tensor, w: PackedWeight, acc_fp16: bool = False) -> torch.Tensor:
    """y = x Wᵀ for x [..., in_features] in float16, bfloat16 or float32; y [..., out_features] in x's dtype.

    Products accumulate in float32, or in float16 with `acc_fp16` (float16 activations only: faster tensor-core
    accumulation, error growing with in_features)."""
    if x.dtype not in ACTIVATION_DTYPES:
        raise BitplanError(f"the Triton kernels take float16, bfloat16 or float32 activations, not {x.dtype}")
    if acc_fp16 and x.dtype != torch.float16:
        raise BitplanError(f"float16 accumulation needs float16 activations, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != w.in_features:
        raise BitplanError(f"activations of shape {tuple(x.shape)} do not match a layer with {w.in_features} inputs")
    if x.device != w.codes.device:
        raise BitplanError(f"activations on {x.device} but the packed weight on {w.codes.device}")
    x2 = x.reshape(-1, w.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*x.shape[:-1], w.out_features)
    y = gemv(x2, w, acc_fp16) if M == 1 else gemm(x2, w, acc_fp16)
    return y.reshape(*x.shape[:-1], w.out_features)


@torch.library.custom_op("bitplan::qmatmul", mutates_args=())
def qmatmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
            lut: torch.Tensor | None, in_features: int, bits: int, p: int, group: int,
            acc_fp16: bool = False) -> torch.Tensor:
    w = PackedWeight(codes, scale, zero, lut, in_features, bits, p, group)
    w.check()
    return matmul(x, w, acc_fp16)


@qmatmul.register_fake
def _qmatmul_fake(x, codes, scale, zero, lut, in_features, bits, p, group, acc_fp16=False):
    torch._check(x.shape[-1] == in_features)
    return x.new_empty(*x.shape[:-1], codes.shape[0])


@torch.library.custom_op("bitplan::hadamard", mutates_args=())
def hadamard(x: torch.Tensor, signs: torch.Tensor, dense: torch.Tensor | None, block: int,
             inverse: bool) -> torch.Tensor:
    return rotate(x, DeviceRotation(signs.numel(), block, signs, dense), inverse)


@hadamard.register_fake
def _hadamard_fake(x, signs, dense, block, inverse):
    torch._check(x.shape[-1] == signs.shape[0])
    return torch.empty_like(x)
