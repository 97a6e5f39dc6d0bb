"""Cross-fitted gains and the choice of H_O shrinkage, against dense formulas, Monte Carlo and real rounding."""
from __future__ import annotations

import pytest
import torch

from bitplan.apply.layer import quantize_layer
from bitplan.formats import get_format
from bitplan.heldout import (SHRINK_GRID, Judge, RotatedHalf, choose_shrink, crossfit, normalized_pair, rotate_factor,
                             rotated_target, shrink, side_gain)
from bitplan.linalg import LDL, LDLSettings, block_ldl, normalize
from bitplan.profile.relerr import rotation_seeds

from tests.test_linalg import spd


@pytest.mark.parametrize("ldl", [LDL, LDLSettings(block=8, sigma=0.05)])
def test_side_gain_equals_the_dense_trace_formula_also_for_a_singular_judge(ldl):
    """tr(L⁻¹ H L⁻ᵀ)/tr H with L⁻¹ by a dense inverse; the judge of rank 10 < 48 has no plain Cholesky. Other
    LDL settings reach the LDL (its block and damping change the gain)."""
    fit, judge = spd(48, seed=1), normalize(spd(48, seed=2, rank=10))
    for lam in (0.0, 0.3, 0.8):
        Hf = normalize(fit)
        Hf = (1 - lam) * Hf + lam * torch.eye(48, dtype=torch.float64)
        Linv = torch.linalg.inv(block_ldl(Hf, ldl.block, sigma=ldl.sigma).L)
        expected = float(torch.trace(Linv @ judge @ Linv.T) / torch.trace(judge))
        assert side_gain(fit, judge, ldl, lam=lam) == pytest.approx(expected, rel=1e-7)
    assert side_gain(fit, judge, ldl, lam=1.0) == 1.0 and side_gain(None, judge, ldl) == 1.0
    target = torch.diag(fit.diagonal())
    for lam in (0.3, 1.0):  # toward the diagonal, λ = 1 is the diagonal itself, not round-to-nearest
        Hf = normalize((1 - lam) * fit + lam * target)
        Linv = torch.linalg.inv(block_ldl(Hf, ldl.block, sigma=ldl.sigma).L)
        expected = float(torch.trace(Linv @ judge @ Linv.T) / torch.trace(judge))
        assert side_gain(fit, judge, ldl, lam=lam, target=target) == pytest.approx(expected, rel=1e-7)


def test_diagonal_target_is_the_original_basis_diagonal_rotated_and_scaled_with_the_factor():
    """Shrinking the rotated, normalized factor toward `rotated_target` = rotating and normalizing the factor
    shrunk toward its own diagonal in the original basis (the rotation is linear and keeps the trace)."""
    H, seed = spd(64, seed=7) * 3.7, 12345
    for lam in (0.0, 0.4, 1.0):
        expected = normalize(rotate_factor((1 - lam) * H + lam * torch.diag(H.diagonal()), seed))
        Hn, T = normalized_pair(rotate_factor(H, seed), rotated_target(H, seed, "diagonal"))
        torch.testing.assert_close(shrink(Hn, lam, T), expected, rtol=1e-10, atol=1e-12)
    assert rotated_target(H, seed, "identity") is None


def test_side_gain_on_own_factor_removes_only_the_damping():
    """L⁻¹(H + σI)L⁻ᵀ = D, so tr(L⁻¹ H L⁻ᵀ) = tr D − σ‖L⁻¹‖²_F."""
    H = normalize(spd(32, seed=5))
    ldl = block_ldl(H, 16)
    Linv = torch.linalg.inv(ldl.L)
    expected = (ldl.trace_d - ldl.sigma * float((Linv ** 2).sum())) / 32
    assert side_gain(H, H) == pytest.approx(expected, rel=1e-8)


def test_side_gain_under_identity_is_never_better_than_rtn():
    assert side_gain(spd(32, seed=6), torch.eye(32, dtype=torch.float64)) >= 1.0


def test_two_sided_gain_predicts_monte_carlo_proxy():
    """E = L_O⁻ᵀ F L_I⁻¹ with white F (what LDLQ leaves): E[tr(H_O E H_I Eᵀ)] = σ² tr(L_O⁻¹H_OL_O⁻ᵀ) tr(L_I⁻¹H_IL_I⁻ᵀ)."""
    m, n = 32, 48
    fit_o, fit_i = normalize(spd(m, 1)), normalize(spd(n, 2))
    judge_o, judge_i = normalize(spd(m, 3)), normalize(spd(n, 4))
    Lo, Li = block_ldl(fit_o, 16).L, block_ldl(fit_i, 16).L
    g = torch.Generator().manual_seed(0)
    F = torch.randn(4000, m, n, dtype=torch.float64, generator=g)
    E = torch.linalg.solve_triangular(Lo.T, F, upper=True)            # L_O⁻ᵀ F
    E = torch.linalg.solve_triangular(Li.T, E, upper=True, left=False)  # · L_I⁻¹
    proxy = torch.einsum("ab,kbc,cd,kad->k", judge_o, E, judge_i, E).mean()
    rtn = float(torch.trace(judge_o) * torch.trace(judge_i))
    predicted = side_gain(fit_o, Judge.of(judge_o)) * side_gain(fit_i, judge_i)
    assert float(proxy) / rtn == pytest.approx(predicted, rel=0.03)


def kronecker_layer(m: int, n: int, samples: int, seed: int):
    """A layer whose Fisher is exactly H_O ⊗ H_I, and two calibration halves of `samples` gradients each:
    G = A_O Z A_Iᵀ with white Z, so E[G Gᵀ] ∝ H_O and E[Gᵀ G] ∝ H_I."""
    g = torch.Generator().manual_seed(seed)
    H_o, H_i = spd(m, seed + 1), spd(n, seed + 2)
    A_o, A_i = torch.linalg.cholesky(H_o), torch.linalg.cholesky(H_i)

    def half():
        G = A_o @ torch.randn(samples, m, n, dtype=torch.float64, generator=g) @ A_i.T
        return (G @ G.transpose(1, 2)).sum(0), (G.transpose(1, 2) @ G).sum(0)
    return H_o, H_i, half(), half(), torch.randn(m, n, dtype=torch.float64, generator=g)


@pytest.mark.parametrize("side", ["out", "in"])
@pytest.mark.parametrize("samples,seed", [(2, 0), (6, 10), (40, 20)])
def test_auto_shrink_is_within_5_percent_of_the_best_lambda_under_the_true_hessian(samples, seed, side):
    """Round W with the summed noisy halves at every λ of the grid (on H_O, or on H_I) and judge each under the
    true H_O ⊗ H_I; the λ chosen from the halves alone must be within 5 % of the best one."""
    m, n, name = 64, 128, "synthetic.layer"
    H_o, H_i, (o_a, i_a), (o_b, i_b), W = kronecker_layer(m, n, samples, seed)
    fmt = get_format("int3-g64")
    true_proxy = {}
    for lam in SHRINK_GRID:
        lams = {"shrink_out": lam} if side == "out" else {"shrink_in": lam}
        res = quantize_layer(name, W, fmt, "yaqa", H_in=i_a + i_b, H_out=o_a + o_b, **lams)
        E = W - res.W_hat.double()
        true_proxy[lam] = float(torch.trace(H_o @ E @ H_i @ E.T))
    seed_out, seed_in = rotation_seeds(name)
    seed_side, a, b = (seed_out, o_a, o_b) if side == "out" else (seed_in, i_a, i_b)
    # H_I is rounded in tiles of 16 columns for int3-g64's vector length 1: the same block as the judgement's
    lam, _ = choose_shrink(rotate_factor(a, seed_side), rotate_factor(b, seed_side))
    assert true_proxy[lam] <= 1.05 * min(true_proxy.values()), (lam, true_proxy)


def test_crossfit_prefers_more_shrinkage_with_fewer_samples():
    """Noisier halves (fewer samples) must not be trusted more: λ chosen with 2 samples ≥ with 200."""
    chosen, chosen_in = {}, {}
    for samples in (2, 200):
        _, _, (o_a, i_a), (o_b, i_b), _ = kronecker_layer(48, 48, samples, seed=3)
        cf = crossfit(RotatedHalf(o_a, i_a, None), RotatedHalf(o_b, i_b, None))
        chosen[samples] = cf.shrink
        chosen_in[samples] = cf.shrink_in
        assert cf.yaqa == pytest.approx(cf.out_gains[cf.shrink] * cf.in_gains[cf.shrink_in])
        assert cf.yaqa_raw == pytest.approx(cf.out_gains[0.0] * cf.in_gains[0.0])
        assert cf.yaqa <= cf.yaqa_raw + 1e-12 and cf.ldlq is None
    assert chosen[2] >= chosen[200] and chosen[2] > 0.0
    assert chosen_in[2] >= chosen_in[200] and chosen_in[2] > 0.0
