"""Two-sided block LDLQ: the exact error decomposition, the one-sided special case, and the ordering
YAQA ≤ one-sided LDLQ ≤ round-to-nearest on the Kronecker proxy."""
from __future__ import annotations

import pytest
import torch

from bitplan.apply.ldlq import ldlq_round, proxy, proxy_by_tiles
from bitplan.formats import get_format
from bitplan.linalg import block_ldl


def spd(n: int, seed: int, rank: int | None = None, ridge: float = 1e-2) -> torch.Tensor:
    """A random SPD matrix with strongly correlated coordinates (low-rank plus a ridge), float64."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, rank or n // 4, generator=g, dtype=torch.float64)
    H = A @ A.T + ridge * torch.eye(n, dtype=torch.float64) * (A * A).sum() / n
    return H / H.diagonal().mean()


def setup(fmt_name: str, m: int, n: int, seed: int = 0):
    fmt = get_format(fmt_name)
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    scale, zero = fmt.per_weight(fmt.fit(W.float()), n)
    return fmt, W, scale.double(), (zero.double() if zero is not None else None)


@pytest.mark.parametrize("fmt_name, block_in", [("int3-g32", 16), ("higgs-p2-n64-g64", 16), ("higgs-p3-n512-g64", 48)])
def test_error_decomposition_identity(fmt_name, block_in):
    """tr(H_O E H_I Eᵀ) = Σ_ij tr((T_ij − Q(T_ij))ᵀ D_O,i (T_ij − Q(T_ij)) D_I,j), exactly (float64)."""
    m, n = 48, 96
    fmt, W, scale, zero = setup(fmt_name, m, n)
    H_in, H_out = spd(n, 1), spd(m, 2)
    ldl_in, ldl_out = block_ldl(H_in, block_in, damp=False), block_ldl(H_out, 16, damp=False)
    r = ldlq_round(W, fmt, scale, zero, ldl_in.L, ldl_out.L, block_in, 16)
    lhs = proxy(W - r.W_hat, H_in, H_out)
    rhs = proxy_by_tiles(r.T, r.W_hat, ldl_in.D, ldl_out.D)
    assert lhs == pytest.approx(rhs, rel=1e-9)
    # The codes decode to exactly the rounded weights.
    assert torch.equal(fmt.decode(r.codes, scale, zero).double(), r.W_hat)


def one_sided_reference(W, fmt, scale, zero, L_in, block):
    """GPTQ/LDLQ written directly: column blocks from the last to the first, feedback E·L̄_I from later columns."""
    m, n = W.shape
    E = torch.zeros_like(W)
    W_hat = torch.zeros_like(W)
    Lbar = L_in - torch.eye(n, dtype=W.dtype)
    for j in range(n // block - 1, -1, -1):
        J = slice(j * block, (j + 1) * block)
        T = W[:, J] + E[:, (j + 1) * block:] @ Lbar[(j + 1) * block:, J]
        W_hat[:, J] = fmt.round(T, scale[:, J], zero[:, J] if zero is not None else None)
        E[:, J] = W[:, J] - W_hat[:, J]
    return W_hat


def test_identity_output_factor_is_one_sided_ldlq():
    m, n = 32, 128
    fmt, W, scale, zero = setup("int4-g32", m, n, seed=3)
    ldl_in = block_ldl(spd(n, 4), 16, damp=False)
    two_sided = ldlq_round(W, fmt, scale, zero, ldl_in.L, torch.eye(m, dtype=torch.float64), 16, 16)
    no_out = ldlq_round(W, fmt, scale, zero, ldl_in.L, None, 16, 16)
    reference = one_sided_reference(W, fmt, scale, zero, ldl_in.L, 16)
    assert torch.equal(two_sided.W_hat, reference) and torch.equal(no_out.W_hat, reference)


def test_identity_factors_are_round_to_nearest():
    fmt, W, scale, zero = setup("higgs-p2-n64-g64", 32, 64, seed=5)
    r = ldlq_round(W, fmt, scale, zero, None, None, 16, 16)
    assert torch.equal(r.W_hat, fmt.round(W, scale, zero))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_sided_beats_one_sided_beats_rtn(seed):
    m, n = 64, 96
    fmt, W, scale, zero = setup("int3-g32", m, n, seed=seed)
    H_in, H_out = spd(n, 10 + seed), spd(m, 20 + seed)
    L_in = block_ldl(H_in, 16, damp=False).L
    L_out = block_ldl(H_out, 16, damp=False).L
    yaqa = proxy(W - ldlq_round(W, fmt, scale, zero, L_in, L_out, 16, 16).W_hat, H_in, H_out)
    ldlq = proxy(W - ldlq_round(W, fmt, scale, zero, L_in, None, 16, 16).W_hat, H_in, H_out)
    rtn = proxy(W - fmt.round(W, scale, zero), H_in, H_out)
    assert yaqa < ldlq < rtn


def test_bad_tiling_is_an_error():
    from bitplan.errors import BitplanError

    fmt, W, scale, zero = setup("higgs-p3-n512-g64", 32, 96)
    with pytest.raises(BitplanError, match="multiple of"):
        ldlq_round(W, fmt, scale, zero, None, None, 16, 16)


@pytest.mark.parametrize("sides", ["both", "input", "output"])
def test_proxy_from_ldl_is_the_proxy_with_the_undamped_factors(sides):
    """proxy_from_ldl recovers H = L D Lᵀ − σI from a damped, overwritten factor: the float64 proxy's value."""
    from bitplan.apply.ldlq import proxy_from_ldl

    m, n = 32, 96
    E = torch.randn(m, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    H_in, H_out = spd(n, 6, rank=8, ridge=0.0), spd(m, 7, rank=4, ridge=0.0)   # singular: damping is needed
    ldl_in = block_ldl(H_in.clone(), 48, overwrite=True) if sides != "output" else None
    ldl_out = block_ldl(H_out.clone(), 16, overwrite=True) if sides != "input" else None
    assert (ldl_in or ldl_out).sigma > 0
    want = proxy(E, H_in if ldl_in else None, H_out if ldl_out else None)
    assert proxy_from_ldl(E, ldl_in, ldl_out) == pytest.approx(want, rel=1e-9)
