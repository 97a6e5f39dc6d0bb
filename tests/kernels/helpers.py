"""Quantized test layers with their float64 reference weights, and the error measure of the acceptance criteria."""
from __future__ import annotations

import torch

from bitplan.formats import Format, default_candidates, get_format
from bitplan.kernels.dequant import PackedWeight

# Max relative error (max |y − ref| / max |ref|) against the float64 product with bitplan's dequantized weight:
# issue 7's acceptance bounds for float32 and float16; bfloat16 has 8 significant bits, and the interpreter
# converts float32 → bfloat16 by truncation (round-to-nearest on GPUs), so its bound is looser.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2e-2}


def kernel_formats() -> list[Format]:
    """Every format a default plan can choose that the kernels compute (all but fp16)."""
    return [f for f in default_candidates() if f.kind != "fp16"]


# Every code width 2..12 over integer and p = 1..4 grid formats and both integer group sizes: every unpacking
# variant (word-aligned and straddling fields, int7 for an integer one) and lookup shape, in few interpreter runs.
SAMPLE = ["int2-g64", "higgs-p1-n8-g128", "int4-g128", "higgs-p1-n32-g128", "higgs-p4-n64-g128", "higgs-p3-n128-g128",
          "higgs-p2-n256-g128", "higgs-p4-n512-g128", "higgs-p3-n1024-g128", "higgs-p2-n2048-g128", "int7-g128",
          "higgs-p4-n4096-g128"]


def sampled_formats() -> list[Format]:
    return [get_format(name) for name in SAMPLE]


def quantized_layer(fmt: Format, m: int, n: int, device, seed: int = 0) -> tuple[PackedWeight, torch.Tensor]:
    """A random m×n layer in `fmt`: its packed weight on `device` and the float64 reference weight
    fmt.dequantize(fmt.unpack(packed)) (on the CPU)."""
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
    tensors = fmt.pack(fmt.quantize(W))
    ref = fmt.dequantize(fmt.unpack(tensors, m, n)).to(torch.float64)
    on_device = {k: v.to(device) for k, v in tensors.items()}
    return PackedWeight.from_format(fmt, on_device, n), ref


def activations(M: int, n: int, dtype: torch.dtype, device, seed: int = 1) -> torch.Tensor:
    return torch.randn(M, n, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().cpu().to(torch.float64), ref.detach().cpu().to(torch.float64)
    assert y.shape == ref.shape and bool(torch.isfinite(y).all())
    return float((y - ref).abs().max() / ref.abs().max())


def reference(x: torch.Tensor, W_ref: torch.Tensor) -> torch.Tensor:
    return x.detach().cpu().to(torch.float64) @ W_ref.T
