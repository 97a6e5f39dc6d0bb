"""Batch-1 GEMV: every format against the float64 reference; precisions and split-K configurations."""
from __future__ import annotations

import pytest
import torch

from bitplan.formats import get_format
from bitplan.kernels.gemv import _config, gemv

from .helpers import (TOLERANCE, activations, kernel_formats, quantized_layer, reference, rel_err,
                      sampled_formats)

M_OUT, N_IN = 37, 300  # odd row count; 300 is not a multiple of the tiles, of g = 128 or of p = 3, 4 (128)


@pytest.mark.parametrize("fmt", kernel_formats(), ids=lambda f: f.name)
def test_every_format_fp32(fmt, device):
    w, W = quantized_layer(fmt, M_OUT, N_IN, device)
    x = activations(1, N_IN, torch.float32, device)
    y = gemv(x, w)
    assert y.dtype == torch.float32 and y.shape == (1, M_OUT)
    assert rel_err(y, reference(x, W)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("fmt", sampled_formats(), ids=lambda f: f.name)
@pytest.mark.parametrize("dtype,acc_fp16", [(torch.float16, False), (torch.float16, True), (torch.bfloat16, False)],
                         ids=["fp16", "fp16-acc16", "bf16"])
def test_half_precision(fmt, dtype, acc_fp16, device):
    w, W = quantized_layer(fmt, M_OUT, N_IN, device)
    x = activations(1, N_IN, dtype, device)
    y = gemv(x, w, acc_fp16=acc_fp16)
    assert y.dtype == dtype
    assert rel_err(y, reference(x, W)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("config", [_config(16, 128, 1), _config(64, 32, 3), _config(32, 64, 16)],
                         ids=["store", "split3", "split16-empty-slices"])
@pytest.mark.parametrize("fmt_name", ["int3-g64", "higgs-p3-n512-g128"])
def test_split_k(config, fmt_name, device):
    """Direct stores, ragged splits, and more splits than K tiles (idle programs must add nothing)."""
    w, W = quantized_layer(get_format(fmt_name), M_OUT, N_IN, device)
    x = activations(2, N_IN, torch.float32, device)  # two rows: the kernel's row axis as well
    assert rel_err(gemv(x, w, config=config), reference(x, W)) <= TOLERANCE[torch.float32]
