"""Batch-1 path: fused dequantize + matrix-vector product, split along K.

Each program owns BLOCK_N output rows and one of SPLIT_K slices of the input dimension; it dequantizes
[BLOCK_N, BLOCK_K] weight tiles, multiplies them elementwise with the activation slice, reduces each tile
into a [BLOCK_N] accumulator and adds its partial sums into a float32 output with atomics. At batch 1 the
weights are read once and the arithmetic runs on CUDA cores, so products stay float32 (the 1e-5 contract,
whatever the activation dtype) unless fp16 accumulation is asked for.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import INTERPRETED, PackedWeight, dequantize_tile


@triton.jit
def _gemv_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, lut_ptr, y_ptr, M, N, K, stride_xm, stride_code,
                 stride_group, stride_ym, BITS: tl.constexpr, P: tl.constexpr, GROUP: tl.constexpr,
                 IS_INT: tl.constexpr, ACC_FP16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)  # one activation row per program along axis 2 (M is 1 on the dispatch path)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # Split boundaries on BLOCK_K multiples, so only the last split has a ragged tail.
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * per_split
    k_end = tl.minimum(k_start + per_split, K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float16 if ACC_FP16 else tl.float32)
    x_row = x_ptr + m * stride_xm
    # num_stages=1: pipelining bit-unpacking loops has crashed LLVM on Ampere (triton #4906) and buys little
    # here, where nothing feeds a tensor-core dot.
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=1):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_end
        x = tl.load(x_row + cols, mask=col_ok, other=0.0)
        w = dequantize_tile(codes_ptr, scale_ptr, zero_ptr, lut_ptr, rows, row_ok, k0, col_ok, stride_code,
                            stride_group, BITS, P, GROUP, IS_INT, BLOCK_K)
        # Reduce every step: a [BLOCK_N] accumulator leaves the registers to the dequantized tile.
        if ACC_FP16:
            acc += tl.sum(w.to(tl.float16) * x.to(tl.float16)[None, :], axis=1)
        else:
            acc += tl.sum(w * x.to(tl.float32)[None, :], axis=1)
    y = acc.to(tl.float32)
    y_at = y_ptr + m * stride_ym + rows
    if SPLIT_K == 1:
        tl.store(y_at, y, mask=row_ok)
    else:
        tl.atomic_add(y_at, y, mask=row_ok, sem="relaxed")


def _config(block_n: int, block_k: int, split_k: int, warps: int = 4) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k}, num_warps=warps, num_stages=1)


# Candidates for GPUs (memory-bound: enough programs to fill the SMs, enough bytes in flight). Tiles stay at
# ≤ 32 weights per thread: gathered codes and table entries cost a 64-bit address each, and larger tiles spill
# (ptxas on sm_90). The interpreter gets one config that exercises the split-K atomics.
_TUNED = [_config(16, 128, 1), _config(16, 128, 2), _config(16, 128, 4), _config(16, 256, 1), _config(32, 128, 1, 8),
          _config(32, 128, 4, 8), _config(64, 64, 1), _config(64, 128, 2, 8)]
INTERPRET_CONFIG = _config(32, 64, 2)

_gemv_tuned = triton.autotune(
    configs=[INTERPRET_CONFIG] if INTERPRETED else _TUNED,
    key=["M", "N", "K", "BITS", "P", "GROUP", "IS_INT", "ACC_FP16"],
    reset_to_zero=["y_ptr"],  # split-K configs accumulate into y while being benchmarked
)(_gemv_kernel)


def gemv(x: torch.Tensor, w: PackedWeight, acc_fp16: bool = False, config: triton.Config | None = None) -> torch.Tensor:
    """y = x Wᵀ for x [M, K] (row-contiguous; M is 1 on the dispatch path), y [M, N] in x's dtype.

    `config` pins block sizes and split (tests); by default they are autotuned per shape and format."""
    M, K = x.shape
    N = w.out_features
    y = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    args = (x, *w.kernel_args(), y, M, N, K, x.stride(0), w.codes.stride(0), w.scale.stride(0), y.stride(0))
    consts = dict(BITS=w.bits, P=w.p, GROUP=w.group, IS_INT=w.is_int, ACC_FP16=acc_fp16)
    if config is None:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"], M)  # noqa: E731
        _gemv_tuned[grid](*args, **consts)
    else:
        grid = (triton.cdiv(N, config.kwargs["BLOCK_N"]), config.kwargs["SPLIT_K"], M)
        _gemv_kernel[grid](*args, **consts, **config.all_kwargs())
    return y.to(x.dtype)
