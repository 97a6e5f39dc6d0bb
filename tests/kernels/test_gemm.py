"""Batched GEMM: every format against the float64 reference at batch 16, batch sizes 3 and 128, precisions
and tile/split configurations."""
from __future__ import annotations

import pytest
import torch

from bitplan.formats import get_format
from bitplan.kernels.gemm import _config, gemm

from .helpers import (TOLERANCE, activations, kernel_formats, quantized_layer, reference, rel_err,
                      sampled_formats)

M_OUT, N_IN = 37, 300


@pytest.mark.parametrize("fmt", kernel_formats(), ids=lambda f: f.name)
def test_every_format_fp32(fmt, device):
    w, W = quantized_layer(fmt, M_OUT, N_IN, device)
    x = activations(16, N_IN, torch.float32, device)
    y = gemm(x, w)
    assert y.dtype == torch.float32 and y.shape == (16, M_OUT)
    assert rel_err(y, reference(x, W)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("fmt", sampled_formats(), ids=lambda f: f.name)
@pytest.mark.parametrize("batch", [3, 128])
@pytest.mark.parametrize("dtype,acc_fp16", [(torch.float32, False), (torch.float16, False), (torch.float16, True)],
                         ids=["fp32", "fp16", "fp16-acc16"])
def test_batches_and_precisions(fmt, batch, dtype, acc_fp16, device):
    w, W = quantized_layer(fmt, M_OUT, N_IN, device)
    x = activations(batch, N_IN, dtype, device)
    y = gemm(x, w, acc_fp16=acc_fp16)
    assert y.dtype == dtype and y.shape == (batch, M_OUT)
    assert rel_err(y, reference(x, W)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("batch", [3, 128])
def test_bfloat16(batch, device):
    w, W = quantized_layer(get_format("higgs-p2-n256-g128"), M_OUT, N_IN, device)
    x = activations(batch, N_IN, torch.bfloat16, device)
    assert rel_err(gemm(x, w), reference(x, W)) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("config", [_config(16, 16, 128, 1), _config(32, 64, 32, 3), _config(32, 32, 16, 24)],
                         ids=["store", "split3", "split24-empty-slices"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("fmt_name", ["int5-g128", "int3-g64"])  # K tiles inside one group / spanning groups
def test_tiles_and_split_k(config, dtype, fmt_name, device):
    w, W = quantized_layer(get_format(fmt_name), M_OUT, N_IN, device)
    x = activations(20, N_IN, dtype, device)
    y = gemm(x, w, config=config)
    assert y.dtype == dtype
    assert rel_err(y, reference(x, W)) <= TOLERANCE[dtype]
