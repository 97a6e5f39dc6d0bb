import pytest
import torch

from bitplan.devices import checkpoint_dtype, resolve_device, resolve_dtype
from bitplan.errors import BitplanError


def test_auto_device_is_cuda_only_when_torch_sees_one():
    expected = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("CPU") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_says_so():
    with pytest.raises(BitplanError, match="no CUDA device"):
        resolve_device("cuda:0")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu:0"])
def test_unknown_devices_are_refused(bad):
    with pytest.raises(BitplanError):
        resolve_device(bad)


def test_dtypes():
    assert resolve_dtype("auto", "cpu", {"torch_dtype": "bfloat16"}) == torch.float32
    assert resolve_dtype("auto", "cuda", {"torch_dtype": "bfloat16"}) == torch.bfloat16
    assert resolve_dtype("auto", "cuda", {"dtype": "float16"}) == torch.float16
    assert resolve_dtype("auto", "cuda", {}) == torch.bfloat16
    assert resolve_dtype("bf16") == torch.bfloat16
    assert resolve_dtype(torch.float16) == torch.float16
    assert checkpoint_dtype({"torch_dtype": "float32"}) == torch.float32
    assert checkpoint_dtype({"torch_dtype": "int8"}) is None
    with pytest.raises(BitplanError, match="unknown --dtype"):
        resolve_dtype("float8")
