"""fp16 passthrough: exact for fp16 inputs, round-to-nearest-even otherwise, clear range errors."""
from __future__ import annotations

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.formats import get_format


def test_exact_for_fp16_values():
    fmt = get_format("fp16")
    W = torch.randn(7, 33).to(torch.float16)
    W[0, :4] = torch.tensor([65504.0, -65504.0, 6e-8, -0.0], dtype=torch.float16)  # extremes, subnormal, -0
    qw = fmt.quantize(W.float())
    assert qw.codes.shape == (7, 33) and int(qw.codes.min()) >= 0 and int(qw.codes.max()) < 2**16
    out = fmt.dequantize(qw)
    assert torch.equal(out.view(torch.int32), W.float().view(torch.int32))  # bit-exact, the sign of -0 included
    assert torch.equal(fmt.round(W.float(), None, None), W.float())


def test_rounds_like_torch_half():
    fmt = get_format("fp16")
    W = torch.randn(16, 64, dtype=torch.float64)
    assert torch.equal(fmt.round(W, None, None), W.to(torch.float16).double())
    assert fmt.mse_q < 1e-7 and not fmt.rotated and fmt.group_size == 0


def test_pack_is_a_plain_fp16_tensor():
    fmt = get_format("fp16")
    W = torch.randn(5, 9)
    qw = fmt.quantize(W)
    t = fmt.pack(qw)
    assert set(t) == {"weight"} and t["weight"].dtype == torch.float16
    assert torch.equal(t["weight"], W.half())
    assert fmt.storage_bits(5, 9) == 16 * 45 == t["weight"].numel() * 16
    assert torch.equal(fmt.dequantize(fmt.unpack(t, 5, 9)), W.half().float())
    with pytest.raises(BitplanError, match="float16 tensor 'weight'"):
        fmt.unpack({"weight": W}, 5, 9)


def test_out_of_range():
    with pytest.raises(BitplanError, match="fp16 range"):
        get_format("fp16").quantize(torch.tensor([[1e5, 0.0]]))
