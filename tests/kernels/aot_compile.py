"""Compile every kernel family for NVIDIA targets without a GPU (run as a script by test_compile.py).

The interpreter does not check what the GPU compiler does (tl.dot shapes and dtypes, constexpr branches,
integer casts, layouts), so this lowers a sample of kernel variants through Triton's CUDA backend to cubin:
    python tests/kernels/aot_compile.py 90 80      # compute capabilities
Prints one line per variant and exits 1 if any fails. Must run without TRITON_INTERPRET.
"""
from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bitplan.kernels.dequant import _dequantize_kernel
from bitplan.kernels.gemm import _TUNED_LARGE, _TUNED_SPLIT, _gemm_kernel
from bitplan.kernels.gemv import _TUNED as _TUNED_GEMV
from bitplan.kernels.gemv import _gemv_kernel
from bitplan.kernels.hadamard import _fwht_kernel, _mix_kernel

# (BITS, P, GROUP, IS_INT): word-aligned and straddling integer codes, a p = 2 grid with aligned and
# straddling codes, p = 3 with 12-bit codes, and a g = 64 format (K tiles spanning groups)
FORMATS = [(4, 1, 128, True), (3, 1, 64, True), (8, 2, 128, False), (6, 2, 128, False), (12, 3, 128, False)]
MATMUL_PTRS = ("codes_ptr", "scale_ptr", "zero_ptr", "lut_ptr")


def variants():
    """(name, kernel, signature, constexprs, num_warps)."""
    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    ptrs = lambda x, y: {"x_ptr": f"*{x}", "codes_ptr": "*i32", "scale_ptr": "*fp16", "zero_ptr": "*fp16",  # noqa: E731
                         "lut_ptr": "*fp32", "y_ptr": f"*{y}"}
    dtypes = [("fp16", False), ("fp16", True), ("fp32", False), ("bf16", False)]
    for i, (bits, p, g, is_int) in enumerate(FORMATS):
        fmt = dict(BITS=bits, P=p, GROUP=g, IS_INT=is_int)
        x, acc16 = dtypes[i % len(dtypes)]
        cfg = _TUNED_GEMV[i % len(_TUNED_GEMV)]
        yield (f"gemv b{bits} p{p} g{g} {x} acc16={acc16} {cfg.kwargs}", _gemv_kernel,
               {**ptrs(x, "fp32"), **ints("M", "N", "K", "stride_xm", "stride_code", "stride_group", "stride_ym")},
               dict(**fmt, ACC_FP16=acc16, **cfg.kwargs), cfg.num_warps)
        for cfg in (_TUNED_SPLIT[i % len(_TUNED_SPLIT)], _TUNED_LARGE[i % len(_TUNED_LARGE)]):
            y = "fp32" if cfg.kwargs["SPLIT_K"] > 1 else x
            yield (f"gemm b{bits} p{p} g{g} {x} acc16={acc16} {cfg.kwargs}", _gemm_kernel,
                   {**ptrs(x, y),
                    **ints("M", "N", "K", "M_BUCKET", "stride_xm", "stride_code", "stride_group", "stride_ym")},
                   dict(**fmt, ACC_FP16=acc16, BF16_AS_FP32=False, **cfg.kwargs), cfg.num_warps)
        yield (f"dequantize b{bits} p{p} g{g}", _dequantize_kernel,
               {**{k: v for k, v in ptrs("fp32", "fp32").items() if k in MATMUL_PTRS}, "out_ptr": "*fp32",
                **ints("N", "K", "stride_code", "stride_group")},
               dict(**fmt, BLOCK_N=32, BLOCK_K=64), 4)
    fwht_sig = {"x_ptr": "*fp16", "y_ptr": "*fp32", "signs_ptr": "*fp32", "R": "i32", "PERIOD": "i32", "scale": "fp32"}
    for N, signs in ((16, 1), (64, 2), (128, 1), (512, 2), (4096, 1)):
        if N < 128:
            c = dict(N=N, SPLIT=False, NP=max(16, N), ROWS=max(16, 2048 // max(16, N)), N1=1, N1P=1, N2=1, SIGNS=signs)
        else:
            N2 = 1 << (N.bit_length() // 2)
            c = dict(N=N, SPLIT=True, NP=1, ROWS=1, N1=N // N2, N1P=max(16, N // N2), N2=N2, SIGNS=signs)
        yield f"fwht N={N} signs={signs}", _fwht_kernel, fwht_sig, c, 4 if N <= 1024 else 16
    mix_sig = {"x_ptr": "*fp32", "h_ptr": "*fp32", "y_ptr": "*fp16", **ints("A", "C", "stride_hi", "stride_hj")}
    for syl, bi in ((True, 16), (False, 32)):
        yield f"mix sylvester={syl}", _mix_kernel, mix_sig, dict(SYLVESTER=syl, BLOCK_I=bi, BLOCK_J=bi, BLOCK_C=64), 4


def main(archs: list[int]) -> int:
    failed = 0
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for name, fn, sig, consts, warps in variants():
            src = ASTSource(fn, {**sig, **{k: "constexpr" for k in consts}}, consts)
            try:
                kernel = triton.compile(src, target=target, options=dict(num_warps=warps, num_stages=1))
                assert kernel.asm.get("cubin"), "no cubin produced"
                print(f"ok   sm_{arch} {name}", flush=True)
            except Exception as e:  # report every failing variant, not just the first
                failed += 1
                print(f"FAIL sm_{arch} {name}: {type(e).__name__}: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [90]))
