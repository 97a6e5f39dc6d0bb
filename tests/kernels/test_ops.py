"""Custom ops: batch dispatch, input checks, torch.library registration (opcheck) and torch.compile."""
from __future__ import annotations

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.formats import RandomizedHadamard, get_format
from bitplan.kernels import gemm as gemm_module
from bitplan.kernels import gemv as gemv_module
from bitplan.kernels.hadamard import device_rotation
from bitplan.kernels.ops import hadamard, matmul, qmatmul

from .helpers import TOLERANCE, activations, quantized_layer, reference, rel_err

M_OUT, N_IN = 24, 160


def op_args(w, x, acc_fp16=False):
    return (x, w.codes, w.scale, w.zero, w.lut, w.in_features, w.bits, w.p, w.group, acc_fp16)


@pytest.mark.parametrize("lead,kernel", [((1,), "gemv"), ((1, 1), "gemv"), ((3,), "gemm"), ((2, 8), "gemm"),
                                         ((128,), "gemm")])
def test_dispatch_by_batch(lead, kernel, device, monkeypatch):
    """One row goes to the GEMV, more to the GEMM; leading dims are flattened and restored."""
    calls = []
    for module, name in ((gemv_module, "gemv"), (gemm_module, "gemm")):
        real = getattr(module, name)
        monkeypatch.setattr(f"bitplan.kernels.ops.{name}", lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    w, W = quantized_layer(get_format("int4-g64"), M_OUT, N_IN, device)
    x = activations(int(torch.tensor(lead).prod()), N_IN, torch.float32, device).reshape(*lead, N_IN)
    y = matmul(x, w)
    assert calls == [kernel] and y.shape == (*lead, M_OUT)
    assert rel_err(y.reshape(-1, M_OUT), reference(x.reshape(-1, N_IN), W)) <= TOLERANCE[torch.float32]


def test_empty_batch_and_strided_input(device):
    w, W = quantized_layer(get_format("higgs-p2-n64-g128"), M_OUT, N_IN, device)
    assert matmul(torch.zeros(0, N_IN, device=device), w).shape == (0, M_OUT)
    x = activations(N_IN, 3, torch.float32, device).T  # [3, N_IN], last dim not contiguous
    assert rel_err(matmul(x, w), reference(x, W)) <= TOLERANCE[torch.float32]


def test_bad_inputs_are_errors(device):
    w, _ = quantized_layer(get_format("int4-g64"), M_OUT, N_IN, device)
    with pytest.raises(BitplanError, match="do not match"):
        matmul(torch.zeros(2, N_IN + 1, device=device), w)
    with pytest.raises(BitplanError, match="float64"):
        matmul(torch.zeros(2, N_IN, dtype=torch.float64, device=device), w)
    with pytest.raises(BitplanError, match="float16 accumulation"):
        matmul(torch.zeros(2, N_IN, device=device), w, acc_fp16=True)


def test_opcheck_qmatmul(device):
    """Schema, fake (meta) implementation and dispatch registration, for an int and a grid format."""
    for name in ("int3-g128", "higgs-p3-n256-g128"):
        w, _ = quantized_layer(get_format(name), M_OUT, N_IN, device)
        torch.library.opcheck(qmatmul, op_args(w, activations(3, N_IN, torch.float32, device)))


def test_opcheck_hadamard(device):
    rot = device_rotation(RandomizedHadamard(192, seed=3), device)
    x = activations(2, 192, torch.float32, device)
    torch.library.opcheck(hadamard, (x, rot.signs, rot.dense, rot.block, True))


def test_torch_compile(device):
    """The ops trace into one graph (fullgraph) and compute what they compute eagerly. On the CPU the backend
    is aot_eager: inductor works there too but compiles C++ for ~20 s on two cores, too slow for CI; it still
    checks dynamo tracing, the fake implementations and functionalization."""
    w, W = quantized_layer(get_format("higgs-p1-n16-g128"), M_OUT, N_IN, device)
    rot = device_rotation(RandomizedHadamard(N_IN, seed=5), device)

    def f(x):
        return qmatmul(*op_args(w, hadamard(x, rot.signs, rot.dense, rot.block, False))) * 2.0 + 1.0

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="inductor" if device.type == "cuda" else "aot_eager", fullgraph=True)
    for batch in (1, 5):
        x = activations(batch, N_IN, torch.float32, device)
        want = reference(RandomizedHadamard(N_IN, seed=5).forward(x.cpu().double()), W) * 2.0 + 1.0
        assert rel_err(compiled(x), want) <= TOLERANCE[torch.float32]
