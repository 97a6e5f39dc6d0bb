"""The Triton randomized Hadamard transform against RandomizedHadamard (float64) for every kind of plan."""
from __future__ import annotations

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.formats import RandomizedHadamard
from bitplan.formats.hadamard import plan
from bitplan.kernels.hadamard import CHUNK, device_rotation, rotate

from .helpers import rel_err

# (n, rows): Sylvester on every kernel path ([rows, N] tiles, N1 × N2 with N1 padded and not, chunks beyond
# CHUNK), Kronecker Had_K ⊗ Had_B with B = 1, 2, 16, 32, 512, and a block-diagonal plan.
DIMS = [(1, 3), (2, 3), (16, 5), (64, 9), (128, 40), (256, 3), (512, 2), (4096, 2), (2 * CHUNK, 1), (12, 3), (24, 3),
        (192, 17), (640, 2), (14336, 1), (1888, 2)]


def test_dims_cover_every_plan_kind():
    kinds = {plan(n).kind for n, _ in DIMS}
    assert kinds == {"sylvester", "kronecker", "block"}
    assert any(plan(n).block > CHUNK for n, _ in DIMS)


@pytest.mark.parametrize("n,rows", DIMS, ids=[str(n) for n, _ in DIMS])
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_equals_randomized_hadamard(n, rows, inverse, device):
    had = RandomizedHadamard(n, seed=1234 + n)
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    ref = had.inverse(x) if inverse else had.forward(x)
    y = rotate(x.float().to(device), device_rotation(had, device), inverse=inverse)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert rel_err(y, ref) <= 1e-6


def test_round_trip_and_leading_dims_fp16(device):
    """Any leading shape; float16 in and out (float32 inside, like RandomizedHadamard)."""
    had = RandomizedHadamard(192, seed=7)
    rot = device_rotation(had, device)
    x = torch.randn(2, 3, 192, generator=torch.Generator().manual_seed(0)).half().to(device)
    y = rotate(x, rot)
    assert y.dtype == torch.float16 and y.shape == x.shape
    assert torch.allclose(y.cpu().float(), had.forward(x.cpu()).float(), atol=2e-3, rtol=0)
    back = rotate(rotate(x.float(), rot), rot, inverse=True)
    assert rel_err(back, x.float()) <= 1e-6


def test_wrong_size_or_dtype_is_an_error(device):
    rot = device_rotation(RandomizedHadamard(64, seed=0), device)
    with pytest.raises(BitplanError, match="size 64"):
        rotate(torch.zeros(2, 32, device=device), rot)
    with pytest.raises(BitplanError, match="float64"):
        rotate(torch.zeros(2, 64, dtype=torch.float64, device=device), rot)
