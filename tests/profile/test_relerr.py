"""The format phase's t² against its definition: each format on its own, quantized and dequantized with exact
ties, on the rotated weight (fp16 on the weight itself), in float64."""
from __future__ import annotations

import pytest
import torch

from bitplan.formats import get_format, rotate_weight
from bitplan.profile.relerr import relative_errors, rotation_seeds

FORMATS = ["higgs-p1-n16-g128", "higgs-p2-n64-g128", "higgs-p2-n4096-g128", "higgs-p3-n512-g128",
           "higgs-p2-n64-g64", "int3-g128", "int4-g64", "fp16"]


def test_relative_errors_are_each_formats_own_round_trip():
    W = torch.randn(64, 192, generator=torch.Generator().manual_seed(3))
    got = relative_errors(W, "model.layers.0.mlp.up_proj", [get_format(f) for f in FORMATS])
    rotated = rotate_weight(W, *rotation_seeds("model.layers.0.mlp.up_proj"))
    for name in FORMATS:
        fmt = get_format(name)
        src = rotated if fmt.rotated else W
        err = src.double() - fmt.dequantize(fmt.quantize(src)).double()
        assert got[name] == pytest.approx(float(err.pow(2).sum() / src.double().pow(2).sum()), rel=1e-12), name
    assert list(got) == FORMATS and got["fp16"] < 1e-6 < got["higgs-p2-n4096-g128"] < got["higgs-p2-n64-g128"]
