"""Randomized Hadamard transforms: constructions, orthonormality in fp32, fast path == dense/float64 reference,
rotate/unrotate, the linear-layer identity, errors."""
from __future__ import annotations

import math

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.formats import RandomizedHadamard, is_supported, rotate_weight, unrotate_weight
from bitplan.formats.hadamard import fwht, hadamard_matrix, plan, sylvester

LISTED = {  # dimension: (construction, K, power-of-two part) as documented in hadamard.py
    192: ("kronecker", 12, 16),
    576: ("kronecker", 36, 16),
    640: ("kronecker", 20, 32),
    1536: ("kronecker", 12, 128),
    2560: ("kronecker", 20, 128),
    3072: ("kronecker", 12, 256),
    11008: ("kronecker", 344, 32),
    14336: ("kronecker", 28, 512),
    28672: ("kronecker", 28, 1024),
}
POWERS = [2**k for k in range(0, 13)]
SMALL = POWERS[:12] + [d for d in LISTED if d <= 3072]  # dense checks (≤ 3072)
LARGE = [4096, 8192, 11008, 14336, 28672]  # checked against a float64 reference built from the factors


@pytest.mark.parametrize("n", list(LISTED))
def test_listed_dimensions_get_the_documented_construction(n):
    p = plan(n)
    assert (p.kind, p.K, p.block) == LISTED[n] and p.K * p.block == n


@pytest.mark.parametrize("n", POWERS)
def test_powers_of_two_are_sylvester(n):
    assert plan(n).kind == "sylvester" and is_supported(n)


@pytest.mark.parametrize("K", sorted({v[1] for v in LISTED.values()} | {4, 44, 60, 100, 148}))
def test_factor_matrices_are_hadamard(K):
    H = hadamard_matrix(K)
    assert H.shape == (K, K) and bool(((H == 1) | (H == -1)).all())
    assert torch.equal(H @ H.T, K * torch.eye(K, dtype=H.dtype))


def fp32_columns(R: RandomizedHadamard, cols: torch.Tensor) -> torch.Tensor:
    """Columns R e_i for i in cols, computed by the fast path in float32."""
    E = torch.zeros(R.n, len(cols))
    E[cols, torch.arange(len(cols))] = 1.0
    out = R.forward(E, dim=0)
    assert out.dtype == torch.float32
    return out.double()


@pytest.mark.parametrize("n", SMALL)
def test_orthonormal_fp32_and_fast_equals_dense(n):
    R = RandomizedHadamard(n, seed=1234 + n)
    dense = R.matrix()
    # R Rᵀ = I in fp32: every column for n ≤ 1536, 256 random columns above (the Gram matrix is O(n³))
    cols = torch.arange(n) if n <= 1536 else torch.randperm(n, generator=torch.Generator().manual_seed(n))[:256]
    C = fp32_columns(R, cols)
    assert (C.T @ C - torch.eye(len(cols), dtype=torch.float64)).abs().max() < 1e-5
    assert (C - dense[:, cols]).abs().max() < 1e-6
    if n <= 1536:
        assert (C @ C.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-5
    x = torch.randn(7, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(R.forward(x), x @ dense.T, atol=1e-12, rtol=0)
    assert torch.allclose(R.inverse(x), x @ dense, atol=1e-12, rtol=0)


def factor_reference(R: RandomizedHadamard, x: torch.Tensor) -> torch.Tensor:
    """H S x in float64 from small factors, no n×n matrix: Had_K ⊗ Had_a ⊗ Had_b (Sylvester Had_{2^k} =
    Had_a ⊗ Had_b for a·b = 2^k), applied to the [K, a, b] reshape of S x."""
    p = R.plan
    K = p.K if p.kind == "kronecker" else p.n // p.block
    A = hadamard_matrix(p.K) if p.kind == "kronecker" else torch.eye(K, dtype=torch.float64)
    a = 2 ** (int(math.log2(p.block)) // 2)
    b = p.block // a
    X = (x * R.signs).reshape(x.shape[0], K, a, b)
    Y = torch.einsum("kK,nKIJ->nkIJ", A, X)  # one factor at a time: no large intermediates
    Y = torch.einsum("iI,nkIJ->nkiJ", sylvester(a), Y)
    Y = torch.einsum("jJ,nkiJ->nkij", sylvester(b), Y)
    return Y.reshape(x.shape[0], p.n) / math.sqrt(p.n)


@pytest.mark.parametrize("n", LARGE)
def test_large_dimensions_against_float64_factors(n):
    R = RandomizedHadamard(n, seed=99)
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = factor_reference(R, x)
    assert torch.allclose(R.forward(x), ref, atol=1e-11, rtol=0)
    assert (R.forward(x.float()).double() - ref).abs().max() < 1e-5
    assert torch.allclose(R.inverse(R.forward(x)), x, atol=1e-12, rtol=0)
    cols = torch.randperm(n, generator=torch.Generator().manual_seed(2))[:64]
    C = fp32_columns(R, cols)
    assert (C.T @ C - torch.eye(64, dtype=torch.float64)).abs().max() < 1e-5


def test_any_dim_and_dtype():
    R = RandomizedHadamard(192, seed=5)
    x = torch.randn(3, 192, 5, dtype=torch.float64)
    y = R.forward(x, dim=1)
    ref = R.forward(x.permute(0, 2, 1), dim=-1).permute(0, 2, 1)
    assert torch.allclose(y, ref, atol=1e-13)
    assert torch.allclose(R.inverse(y, dim=-2), x, atol=1e-12)
    xb = torch.randn(4, 192).to(torch.bfloat16)
    assert R.forward(xb).dtype == torch.bfloat16


def test_seeds_are_reproducible_and_matter():
    a, b, c = RandomizedHadamard(576, 7), RandomizedHadamard(576, 7), RandomizedHadamard(576, 8)
    assert torch.equal(a.signs, b.signs) and not torch.equal(a.signs, c.signs)
    assert set(a.signs.tolist()) == {-1.0, 1.0}
    RandomizedHadamard(64, 2**64 - 1)  # the full 64-bit seed range is accepted
    for bad in (-1, 2**64, 1.5, "3"):
        with pytest.raises(BitplanError, match="seed"):
            RandomizedHadamard(64, bad)


@pytest.mark.parametrize("m, n", [(192, 576), (576, 1536), (64, 640), (32, 11008)])
def test_rotate_unrotate(m, n):
    g = torch.Generator().manual_seed(m + n)
    W = torch.randn(m, n, dtype=torch.float64, generator=g)
    W_rot = rotate_weight(W, 11, 22)
    assert torch.allclose(unrotate_weight(W_rot, 11, 22), W, atol=1e-12)
    assert torch.allclose(W_rot.norm(), W.norm(), rtol=1e-12)
    if max(m, n) <= 1536:
        Rm, Rn = RandomizedHadamard(m, 11).matrix(), RandomizedHadamard(n, 22).matrix()
        assert torch.allclose(W_rot, Rm @ W @ Rn.T, atol=1e-11)


def test_linear_layer_identity():
    """y = x Wᵀ = R_m.inverse(R_n.forward(x) @ W_rotᵀ), the identity the quantized layer uses at inference."""
    m, n = 192, 576
    g = torch.Generator().manual_seed(0)
    W = torch.randn(m, n, dtype=torch.float64, generator=g)
    x = torch.randn(10, n, dtype=torch.float64, generator=g)
    W_rot = rotate_weight(W, 3, 4)
    Rm, Rn = RandomizedHadamard(m, 3), RandomizedHadamard(n, 4)
    assert torch.allclose(Rm.inverse(Rn.forward(x) @ W_rot.T), x @ W.T, atol=1e-11)


@pytest.mark.parametrize("n", [6, 10, 14, 18, 1001, 0, -4])
def test_unsupported_dimensions(n):
    assert not is_supported(n)
    with pytest.raises(BitplanError, match="power of two"):
        RandomizedHadamard(n, 0)


def test_block_diagonal_fallback():
    """1888 = 59·32: no Paley order among 59·4 .. 59·32, so 59 diagonal blocks of Had_32."""
    n = 1888
    p = plan(n)
    assert (p.kind, p.block) == ("block", 32)
    R = RandomizedHadamard(n, 1)
    x = torch.randn(3, n, dtype=torch.float64)
    dense = R.matrix()
    assert torch.allclose(R.forward(x), x @ dense.T, atol=1e-12)
    assert torch.allclose(dense @ dense.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert (dense[:32, 32:] == 0).all()  # mixing stays inside a block


def test_wrong_size_and_type():
    R = RandomizedHadamard(64, 0)
    with pytest.raises(BitplanError, match="size 64"):
        R.forward(torch.zeros(3, 32))
    with pytest.raises(BitplanError, match="2-D"):
        rotate_weight(torch.zeros(4), 0, 0)


@pytest.mark.parametrize("N", [1, 2, 8, 32, 64, 128, 1024, 2048])
def test_fwht_tiles_equal_the_dense_sylvester_matrix(N):
    # the tiled matmuls (N = 32·32·2 … ) against the Sylvester matrix built by doubling, on leading dims
    x = torch.randn(3, 5, N, dtype=torch.float64, generator=torch.Generator().manual_seed(N))
    assert torch.allclose(fwht(x), x @ sylvester(N), atol=1e-12 * math.sqrt(N), rtol=0)
    assert (fwht(x.float()).double() - x @ sylvester(N)).abs().max() < 1e-5 * math.sqrt(N)


def test_fwht_needs_a_power_of_two():
    with pytest.raises(BitplanError, match="power-of-two"):
        fwht(torch.zeros(2, 12))
