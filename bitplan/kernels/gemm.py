"""Batched path: fused dequantize + matrix product on tensor cores, optionally split along K.

Each program computes a [BLOCK_M, BLOCK_N] output tile: it dequantizes a [BLOCK_N, BLOCK_K] weight tile in
registers and feeds it to `tl.dot` with the activation tile. Operands are in the activation dtype (fp16 /
bf16 weights are rounded once, as the PyTorch path does); float32 activations keep float32 weights and an
IEEE float32 dot. Programs along M are adjacent in launch order so the M tiles of one weight tile run
together and the weight bytes are fetched from DRAM about once.

Two autotuned variants, as in gemlite: for small batches (2..64 rows) SPLIT_K slices K across programs to
fill the GPU and adds float32 partials with atomics; for larger batches each program owns its tile and
stores it directly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dequant import INTERPRETED, PackedWeight, dequantize_tile

SPLIT_K_MAX_M = 64  # batches up to this size use the split-K variant


@triton.jit
def _gemm_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, lut_ptr, y_ptr, M, N, K, M_BUCKET, stride_xm, stride_code,
                 stride_group, stride_ym, BITS: tl.constexpr, P: tl.constexpr, GROUP: tl.constexpr,
                 IS_INT: tl.constexpr, ACC_FP16: tl.constexpr, BF16_AS_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    # M_BUCKET (M rounded up to a power of two) is only an autotuning key: prefill lengths vary and must not
    # each trigger a new tuning run.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m
    pid_n = pid // num_m
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rows_m < M
    n_ok = rows_n < N
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * per_split
    k_end = tl.minimum(k_start + per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float16 if ACC_FP16 else tl.float32)
    x_rows = x_ptr + rows_m[:, None].to(tl.int64) * stride_xm
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=1):  # see gemv.py on num_stages
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_end
        x = tl.load(x_rows + cols[None, :], mask=m_ok[:, None] & col_ok[None, :], other=0.0)
        w = dequantize_tile(codes_ptr, scale_ptr, zero_ptr, lut_ptr, rows_n, n_ok, k0, col_ok, stride_code,
                            stride_group, BITS, P, GROUP, IS_INT, BLOCK_K)
        if x.dtype == tl.float32:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        elif BF16_AS_FP32:
            # The interpreter's bf16 tl.dot returns garbage; bf16 products are exact in float32, so the same
            # numbers come from rounding the weights to bf16 and multiplying in float32.
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.bfloat16).to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, out_dtype=acc.dtype)
    y_at = y_ptr + rows_m[:, None].to(tl.int64) * stride_ym + rows_n[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(y_at, acc, mask=mask)
    else:
        tl.atomic_add(y_at, acc.to(tl.float32), mask=mask, sem="relaxed")


def _config(bm: int, bn: int, bk: int, split_k: int = 1, warps: int = 4) -> triton.Config:
    # num_stages is moot: the K loop pins num_stages=1 (see gemv.py).
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split_k}, num_warps=warps,
                         num_stages=1)


def _fits_batch(configs, named_args, **kwargs):
    """Drop tiles much taller than the batch (tl.dot needs BLOCK_M ≥ 16); keep at least one."""
    limit = max(16, triton.next_power_of_2(named_args["M"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= limit]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]


# Weight tiles of ≤ 32 entries per thread (more spills on sm_90, see gemv.py), M tiles from 16 (tl.dot's minimum).
_TUNED_SPLIT = [_config(16, 64, 64, 1), _config(16, 64, 64, 4), _config(16, 64, 64, 8), _config(16, 128, 32, 2),
                _config(32, 64, 64, 2), _config(32, 128, 64, 4, 8), _config(64, 64, 64, 2, 8),
                _config(64, 128, 64, 1, 8)]
_TUNED_LARGE = [_config(64, 64, 64, warps=8), _config(64, 128, 64, warps=8), _config(128, 64, 64, warps=8),
                _config(128, 128, 32, warps=8), _config(64, 256, 32, warps=8)]
# The interpreter gets fixed tiles: split-K with atomics for small batches, direct stores for large ones.
INTERPRET_SPLIT = _config(16, 32, 64, 2)
INTERPRET_LARGE = _config(64, 32, 64, 1)

_KEY = ["M_BUCKET", "N", "K", "BITS", "P", "GROUP", "IS_INT", "ACC_FP16"]
_gemm_split = triton.autotune(
    configs=[INTERPRET_SPLIT] if INTERPRETED else _TUNED_SPLIT, key=_KEY, reset_to_zero=["y_ptr"],
    prune_configs_by={"early_config_prune": _fits_batch},
)(_gemm_kernel)
_gemm_large = triton.autotune(
    configs=[INTERPRET_LARGE] if INTERPRETED else _TUNED_LARGE, key=_KEY,
    prune_configs_by={"early_config_prune": _fits_batch},
)(_gemm_kernel)


def gemm(x: torch.Tensor, w: PackedWeight, acc_fp16: bool = False, config: triton.Config | None = None) -> torch.Tensor:
    """y = x Wᵀ for x [M, K] (row-contiguous), y [M, N] in x's dtype.

    `config` pins tiles and split (tests); by default batches up to SPLIT_K_MAX_M rows autotune over split-K
    tiles, larger ones over direct-store tiles."""
    M, K = x.shape
    N = w.out_features
    split = config.kwargs["SPLIT_K"] > 1 if config is not None else M <= SPLIT_K_MAX_M
    # Split-K partials are summed in a zeroed float32 buffer; otherwise tiles store straight into the output.
    if split:
        y = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    args = (x, *w.kernel_args(), y, M, N, K, triton.next_power_of_2(M), x.stride(0), w.codes.stride(0),
            w.scale.stride(0), y.stride(0))
    consts = dict(BITS=w.bits, P=w.p, GROUP=w.group, IS_INT=w.is_int, ACC_FP16=acc_fp16,
                  BF16_AS_FP32=INTERPRETED and x.dtype == torch.bfloat16)
    if config is None:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),  # noqa: E731
                             meta["SPLIT_K"])
        (_gemm_split if split else _gemm_large)[grid](*args, **consts)
    else:
        kw = config.kwargs
        grid = (triton.cdiv(M, kw["BLOCK_M"]) * triton.cdiv(N, kw["BLOCK_N"]), kw["SPLIT_K"])
        _gemm_kernel[grid](*args, **consts, **config.all_kwargs())
    return y.to(x.dtype)
