"""bitplan.linalg: normalize, damped Cholesky, block LDL and the LDLQ gains, against float64 references."""
from __future__ import annotations

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.linalg import LDL, LDLSettings, block_ldl, damped_cholesky, ldl_gain, normalize


def spd(n: int, seed: int = 0, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, rank or 2 * n, dtype=torch.float64, generator=g)
    A = A * torch.linspace(0.2, 3.0, A.shape[1], dtype=torch.float64)  # an uneven spectrum
    return A @ A.T


def test_normalize_gives_mean_diagonal_one():
    H = normalize(spd(24) * 1e7)
    assert float(H.diagonal().mean()) == pytest.approx(1.0, abs=1e-14)


def test_normalize_rejects_empty_factor():
    with pytest.raises(BitplanError, match="mean diagonal"):
        normalize(torch.zeros(4, 4, dtype=torch.float64))


@pytest.mark.parametrize("block", [1, 4, 16])
def test_block_ldl_reconstructs_damped_factor(block):
    H = normalize(spd(64, seed=block))
    ldl = block_ldl(H, block)
    assert ldl.sigma == pytest.approx(0.01)
    rebuilt = ldl.L @ ldl.dense_d() @ ldl.L.T
    target = H + ldl.sigma * torch.eye(64, dtype=torch.float64)
    assert float((rebuilt - target).abs().max()) < 1e-10
    nb = 64 // block
    Lb = ldl.L.view(nb, block, nb, block)
    for i in range(nb):
        assert torch.equal(Lb[i, :, i, :], torch.eye(block, dtype=torch.float64))   # unit diagonal blocks
        for j in range(i + 1, nb):
            assert float(Lb[i, :, j, :].abs().max()) == 0.0                          # block-lower
    assert torch.allclose(ldl.D, ldl.D.transpose(-1, -2))


def test_block_ldl_d_blocks_are_schur_complements():
    """D_j = H_jj − H_j,<j H_<j,<j⁻¹ H_<j,j: the conditional covariance of block j given the earlier blocks."""
    H = normalize(spd(48, seed=3))
    ldl = block_ldl(H, 16, damp=False)
    for j in range(3):
        s, e = 16 * j, 16 * (j + 1)
        ref = H[s:e, s:e] - (H[s:e, :s] @ torch.linalg.solve(H[:s, :s], H[:s, s:e]) if s else 0)
        assert float((ldl.D[j] - ref).abs().max()) < 1e-10


def test_damping_repeats_until_cholesky_succeeds():
    # rank 2 in 32 dimensions with a negative eigenvalue of about −0.035 after normalization
    H = normalize(spd(32, rank=2))
    v = torch.ones(32, dtype=torch.float64) / 32 ** 0.5
    H = H - 0.035 * torch.outer(v, v)
    dc = damped_cholesky(H, sigma=0.01)
    assert dc.sigma == pytest.approx(0.04)
    lam = float(torch.linalg.eigvalsh(H).min())
    assert dc.sigma + lam > 0 and dc.sigma - 0.01 + lam <= 1e-9   # the smallest multiple of σ that works


def test_damping_gives_up_with_a_clear_error():
    H = -torch.eye(8, dtype=torch.float64)
    with pytest.raises(BitplanError, match="model.layers.3.mlp.up_proj"):
        damped_cholesky(H, sigma=0.01, max_tries=5, name="model.layers.3.mlp.up_proj")


def test_block_ldl_rejects_dimension_not_multiple_of_block():
    with pytest.raises(BitplanError, match="multiple"):
        block_ldl(normalize(spd(20)), 16)


def test_ldl_gain_extremes():
    # a diagonal factor gives no feedback: LDLQ = round-to-nearest (up to the damping)
    D = torch.diag(torch.linspace(0.5, 2.0, 32, dtype=torch.float64))
    assert ldl_gain(D) == pytest.approx(1.01, rel=1e-12)
    # rank 4: once the first block of 4 is known the rest is predicted (up to the damping) and D is ≈ σ there
    H = normalize(spd(32, rank=4))
    first = float(torch.trace(H[:4, :4]))
    assert (first + 32 * 0.01) / 32 <= ldl_gain(H, LDLSettings(block=4)) <= (first + 32 * 0.03) / 32


def test_the_ldl_settings_are_those_the_shipped_profile_records():
    """A profile is reused only while its recorded LDL settings match (its fingerprint): the one set of settings
    must stay the values the shipped profile was made with."""
    import json
    from pathlib import Path

    recorded = json.loads((Path(__file__).parents[1] / "profiles/smollm2-135m/profile.json").read_text())["settings"]
    assert (LDL.block, LDL.sigma) == (recorded["ldl_block"], recorded["ldl_sigma"])
    assert recorded["fingerprint"]["ldl_block"] == LDL.block and recorded["fingerprint"]["ldl_sigma"] == LDL.sigma
    with pytest.raises(AttributeError):
        LDL.sigma = 0.02  # frozen: no caller can change them for everyone


def test_overwriting_ldl_equals_the_copying_one():
    """overwrite=True symmetrizes and damps in H's own buffer: bit for bit the copying path, H then spent."""
    from bitplan.linalg import relative_error, relative_error_of_blocks, symmetrize_

    A = torch.randn(100, 100, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    H = normalize(A @ A.T + 0.01 * A)                                    # not quite symmetric
    assert torch.equal(symmetrize_(H.clone(), tile=32), (H + H.T) / 2)
    ref = block_ldl(H[:96, :96], 16)
    got = block_ldl(H[:96, :96].clone(), 16, overwrite=True)
    assert torch.equal(ref.L, got.L) and torch.equal(ref.D, got.D) and ref.sigma == got.sigma
    W = torch.randn(300, 7, dtype=torch.float64)
    W_hat = W + 0.1 * torch.randn(300, 7, dtype=torch.float64)
    want = float((W - W_hat).pow(2).sum() / W.pow(2).sum())
    assert relative_error(W.float(), W_hat) == pytest.approx(want, rel=1e-6)
    assert relative_error_of_blocks([(W[:100], W_hat[:100]), (W[100:], W_hat[100:])], block_bytes=8 * 7 * 16) \
        == pytest.approx(want, rel=1e-12)
