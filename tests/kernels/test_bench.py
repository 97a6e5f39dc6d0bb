"""benchmarks/kernels_bench.py: exits cleanly without a GPU; its byte count and timed layer are right."""
from __future__ import annotations

import pytest
import torch

from benchmarks import kernels_bench as bench
from bitplan.formats import get_format
from bitplan.kernels.dequant import dequantize

from .helpers import TOLERANCE, rel_err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed where there is no GPU")
def test_without_gpu_prints_and_exits_0(capsys):
    assert bench.main(["--no-model"]) == 0
    assert "no" in capsys.readouterr().out.lower()


@pytest.mark.parametrize("fmt_name", ["int3-g128", "higgs-p2-n64-g128"])
def test_layer_case(fmt_name, device):
    """Bytes read = the packed tensors + grid table + activations; the timed layer computes
    R_outᵀ(R_in(x) Ŵᵀ) with Ŵ the dequantized random codes."""
    fmt = get_format(fmt_name)
    case = bench.layer_case(fmt, 40, 192, 3, device, dtype=torch.float32)
    w = case.w
    tensors = [t for t in (w.codes, w.scale, w.zero, w.lut, case.x) if t is not None]
    assert case.read_bytes == sum(t.numel() * t.element_size() for t in tensors)
    W = dequantize(w).cpu().double()
    want = case.had_out.inverse(case.had_in.forward(case.x.cpu().double()) @ W.T)
    assert rel_err(case.layer(), want) <= TOLERANCE[torch.float32]
    assert rel_err(case.kernel(), case.x.cpu().double() @ W.T) <= TOLERANCE[torch.float32]
