"""The format phase's t² against its definition: each format on its own, quantized and dequantized with exact
ties, on the rotated weight (fp16 on the weight itself), in float64."""
from __future__ import annotations

import pytest
import torch

from bitplan.formats import get_format, rotate_weight
from bitplan.profile import relerr
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


CHUNKED = FORMATS + ["q4_K", "q6_K", "q4_0", "iq4_nl"]


@pytest.mark.parametrize("importance", [False, True])
def test_blocks_of_rows_give_the_whole_matrixs_errors(importance):
    # 44 rows measured 8 at a time: five whole blocks and a 4-row tail; K-types' 256-wide blocks along the row
    W = torch.randn(44, 512, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.1, 3.0, 44)[:, None]
    imp = torch.rand(512, generator=torch.Generator().manual_seed(6)) + 0.1 if importance else None
    fmts = [get_format(f) for f in CHUNKED]
    whole = relative_errors(W, "model.layers.1.mlp.down_proj", fmts, imp, block_bytes=1 << 40)
    rows = 8 * 512 * relerr.WORK_BYTES_PER_WEIGHT
    assert relerr.block_rows(44, 512, rows) == 8 and relerr.block_rows(44, 512, 1 << 40) == 44
    chunked = relative_errors(W, "model.layers.1.mlp.down_proj", fmts, imp, block_bytes=rows)
    assert list(chunked) == CHUNKED
    for name in CHUNKED:
        assert chunked[name] == pytest.approx(whole[name], rel=1e-12, abs=0), name
    # and a row at a time, against each format's own round trip of the whole matrix
    one = relative_errors(W, "model.layers.1.mlp.down_proj", fmts, imp, block_bytes=1)
    rotated = rotate_weight(W, *rotation_seeds("model.layers.1.mlp.down_proj"))
    for name in CHUNKED:
        fmt = get_format(name)
        src = rotated if fmt.rotated else W
        q = fmt.dequantize(fmt.quantize(src, imp) if imp is not None and fmt.kind == "ggml" else fmt.quantize(src))
        ref = float((src.double() - q.double()).pow(2).sum() / src.double().pow(2).sum())
        assert one[name] == pytest.approx(ref, rel=1e-12), name
