"""QuantizedLinear on the kernels: equal to its PyTorch path, through `quantized_matmul` and the module hook."""
from __future__ import annotations

import pytest
import torch

from bitplan.apply import quantize_layer
from bitplan.apply.module import QuantizedLinear, _triton_matmul
from bitplan.formats import get_format
from bitplan.kernels.linear import quantized_matmul, supports

from .helpers import TOLERANCE, rel_err

# in 192 = Had_12 ⊗ Had_16 (Kronecker), out 40 = Had_20 ⊗ Had_2: both rotation paths with a dense factor.
N_IN, M_OUT = 192, 40


def make_layer(fmt_name: str, bias: bool) -> QuantizedLinear:
    W = torch.randn(M_OUT, N_IN, generator=torch.Generator().manual_seed(0))
    res = quantize_layer("proj", W, get_format(fmt_name), "rtn")
    b = torch.randn(M_OUT) if bias else None
    return QuantizedLinear(N_IN, M_OUT, fmt_name, res.tensors, bias=b)


@pytest.mark.parametrize("fmt_name", ["int4-g128", "higgs-p2-n256-g128", "higgs-p3-n1024-g128"])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_equals_pytorch_path(fmt_name, batch, device):
    layer = make_layer(fmt_name, bias=False)
    x = torch.randn(batch, N_IN, generator=torch.Generator().manual_seed(1))
    want = layer(x.double())  # PyTorch path in float64: rotations and the dequantized weight, no kernel
    got = quantized_matmul(x.to(device), layer.to(device))
    assert rel_err(got, want) <= TOLERANCE[torch.float32]


def test_module_hook(device):
    """The hook QuantizedLinear.forward calls on CUDA: kernel result for int and grid formats, None for fp16."""
    layer = make_layer("higgs-p2-n64-g128", bias=True).to(device)
    x = torch.randn(2, 5, N_IN, generator=torch.Generator().manual_seed(2)).to(device)
    want = layer.cpu()(x.cpu().double()).to(torch.float32)
    layer.to(device)
    y = _triton_matmul(layer, x)
    assert y is not None and rel_err(y + layer.bias, want) <= TOLERANCE[torch.float32]
    if device.type == "cuda":  # the forward itself takes the kernel path
        assert rel_err(layer(x), want) <= TOLERANCE[torch.float32]
    assert _triton_matmul(make_layer("fp16", bias=False).to(device), x) is None
    assert not supports(layer, x.double())
    assert not supports(layer, x.clone().requires_grad_())  # no backward in the ops: the PyTorch path


def test_half_precision_layer(device):
    layer = make_layer("int3-g64", bias=False).to(device)
    x = torch.randn(4, N_IN, generator=torch.Generator().manual_seed(3)).half()
    want = layer.cpu()(x.double())
    layer.to(device)
    y = quantized_matmul(x.to(device), layer)
    assert y.dtype == torch.float16
    assert rel_err(y, want) <= TOLERANCE[torch.float16]


@pytest.mark.parametrize("warm", [True, False], ids=["warm-fullgraph", "cold"])
def test_torch_compile_layer(warm, device):
    """The layer's kernel path (the hook's lazy import, both rotations, the matmul) under torch.compile. After
    one eager call has built the layer's device tables it traces as one graph (fullgraph); from a cold start
    the table construction runs eagerly behind one graph break. On the CPU the backend is aot_eager on the hook
    (forward only takes the kernel path for CUDA tensors; see test_ops.test_torch_compile); on a GPU, inductor
    on the module itself."""
    layer = make_layer("higgs-p2-n256-g128", bias=True)
    x = torch.randn(3, N_IN, generator=torch.Generator().manual_seed(4))
    want = layer(x.double())
    layer.to(device)
    x = x.to(device)
    fn = layer if device.type == "cuda" else (lambda x: _triton_matmul(layer, x) + layer.bias)
    if warm:
        fn(x)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="inductor" if device.type == "cuda" else "aot_eager", fullgraph=warm)
    for _ in range(2):
        assert rel_err(compiled(x), want) <= TOLERANCE[torch.float32]
