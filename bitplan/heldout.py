"""Cross-fitted judgements of adaptive rounding: fit on one calibration half, judge under the other.

With small calibration the factors are mostly noise, and anything judged on the factors it was fitted to is
wildly optimistic (DESIGN.md, "What a CPU prototype measured"). Everything here is therefore computed both ways,
half a → b and b → a, and averaged.

Block LDLQ from a fitted factor H_fit = L D Lᵀ leaves the error E = L⁻ᵀ R, where the innovation R (each tile's
target minus its rounding) is white with the format's error variance. Under a judging factor H its expected
proxy is σ² tr(L⁻¹ H L⁻ᵀ), against σ² tr(H) for round-to-nearest; two-sided the two sides multiply:

    gain(fit → judge) = tr(L_O⁻¹ H_O L_O⁻ᵀ)/tr(H_O) · tr(L_I⁻¹ H_I L_I⁻ᵀ)/tr(H_I).

This is the held-out proxy of "round with one half's factors, judge with the other's" in expectation over the
rounding noise, so the shrinkage choice does not depend on one particular rounding's luck, and it costs one LDL
per candidate λ instead of a rounding. All factors are taken in the rotated basis the weights are rounded in
(LDL is not rotation-invariant).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import BitplanError
from .formats import RandomizedHadamard
from .linalg import damped_cholesky, normalize

# λ = 0 is the raw sketch, λ = 1 one-sided (H_O = I). DESIGN.md's grid plus 0, so that large calibration can
# choose the raw factor.
SHRINK_GRID = (0.0, 0.1, 0.3, 0.6, 0.8, 1.0)


def rotate_factor(H: torch.Tensor, seed: int) -> torch.Tensor:
    """R H Rᵀ for the randomized Hadamard R of `seed` (the factor seen by weights rotated with that seed)."""
    had = RandomizedHadamard(H.shape[0], seed)
    return had.forward(had.forward(H.to(torch.float64), dim=0), dim=1)


def shrink(Hn: torch.Tensor, lam: float) -> torch.Tensor:
    """(1 − λ)·H + λ·I of a normalized factor."""
    if lam == 0.0:
        return Hn
    return (1.0 - lam) * Hn + lam * torch.eye(Hn.shape[0], dtype=Hn.dtype)


@dataclass
class Judge:
    """A normalized judging factor H = C Cᵀ, prepared once for every λ and direction it judges."""
    chol: torch.Tensor
    trace: float

    @classmethod
    def of(cls, H: torch.Tensor) -> "Judge":
        Hn = normalize(H.to(torch.float64))
        Hn = (Hn + Hn.T) / 2
        # A half's factor can be singular (fewer samples than rows) and, stored in float32, a little indefinite.
        # The smallest ε·I (relative to the mean diagonal) that makes the Cholesky exist changes the judged
        # trace by ε·‖L⁻¹‖²_F / tr H ≤ 100·ε relative for a fit damped by ≥ 0.01; float32 rounding needs ≤ 1e-6.
        eye = torch.eye(Hn.shape[0], dtype=Hn.dtype)
        for eps in (1e-10, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3):
            chol, info = torch.linalg.cholesky_ex(Hn + eps * eye)
            if int(info) == 0:
                break
        else:
            raise BitplanError("a calibration half's Hessian factor is far from positive semi-definite "
                               "(non-finite or corrupted statistics)")
        return cls(chol=chol, trace=float(Hn.diagonal().sum()))


def side_gain(H_fit: torch.Tensor | None, judge: "Judge | torch.Tensor", block: int = 16, sigma: float = 0.01,
              lam: float = 0.0, name: str = "a layer") -> float:
    """tr(L⁻¹ H L⁻ᵀ) / tr(H) for L from the block LDL of normalize(H_fit) shrunk by λ, judged under H
    (None or λ = 1: L = I, round-to-nearest on this side, gain 1).

    With the damped fit's Cholesky C (L = C·blockdiag(C_ii)⁻¹) and H = C_J C_Jᵀ:
    tr(L⁻¹ H L⁻ᵀ) = ‖blockdiag(C_ii) · C⁻¹ C_J‖²_F, one triangular solve.
    """
    if H_fit is None or lam == 1.0:
        return 1.0
    if not isinstance(judge, Judge):
        judge = Judge.of(judge)
    n = judge.chol.shape[0]
    C = damped_cholesky(shrink(normalize(H_fit.to(torch.float64)), lam), sigma=sigma, name=name).chol
    Y = torch.linalg.solve_triangular(C, judge.chol, upper=False).view(n // block, block, n)
    diag = torch.stack([C[i:i + block, i:i + block] for i in range(0, n, block)])
    return float((diag @ Y).pow(2).sum()) / judge.trace


@dataclass
class RotatedHalf:
    """One calibration half of a layer's factors, rotated into the rounding basis."""
    h_out: torch.Tensor
    h_in: torch.Tensor
    xtx: torch.Tensor | None


@dataclass
class CrossFit:
    """Held-out gains of a layer (expected proxy ÷ round-to-nearest's, judged under the Fisher factors)."""
    shrink: float                     # the λ on SHRINK_GRID with the smallest held-out two-sided gain
    out_gains: dict[float, float]     # λ → held-out H_O-side gain (the H_I side does not depend on λ)
    in_gain: float                    # held-out H_I-side gain of the sketch's H_I
    yaqa: float                       # two-sided, at the chosen λ
    yaqa_raw: float                   # two-sided, λ = 0
    ldlq: float | None                # one-sided LDLQ with H_I = Σxxᵀ (None without xtx)


def both_ways(fn, a, b) -> float:
    """½ (fn(a → b) + fn(b → a)): fit on one half, judge on the other, and the other way round."""
    return 0.5 * (fn(a, b) + fn(b, a))


def choose_shrink(h_out_a: torch.Tensor, h_out_b: torch.Tensor, block: int = 16, sigma: float = 0.01,
                  grid: tuple[float, ...] = SHRINK_GRID, name: str = "a layer") -> tuple[float, dict[float, float]]:
    """The λ on `grid` whose shrunk H_O has the smallest held-out H_O-side gain, and every λ's gain.
    (The H_I side multiplies every λ's two-sided gain by the same number, so it does not enter the choice.)"""
    a, b = (h_out_a, Judge.of(h_out_a)), (h_out_b, Judge.of(h_out_b))
    gains = {lam: both_ways(lambda f, j: side_gain(f[0], j[1], block, sigma, lam, f"{name} (H_out)"), a, b)
             for lam in grid}
    return min(grid, key=lambda lam: (gains[lam], lam)), gains


def crossfit(a: RotatedHalf, b: RotatedHalf, block_in: int = 16, block_out: int = 16, sigma: float = 0.01,
             grid: tuple[float, ...] = SHRINK_GRID, name: str = "a layer") -> CrossFit:
    """Held-out gains both ways (a → b, b → a, averaged) and the shrinkage λ of H_O that minimizes them."""
    def both(fn) -> float:
        return both_ways(fn, a, b)

    best, out_gains = choose_shrink(a.h_out, b.h_out, block_out, sigma, grid, name)
    judges = {id(a): Judge.of(a.h_in), id(b): Judge.of(b.h_in)}  # H_I judges both the sketch's and Σxxᵀ's LDL
    in_gain = both(lambda f, j: side_gain(f.h_in, judges[id(j)], block_in, sigma, 0.0, f"{name} (H_in)"))
    raw_out = out_gains[0.0] if 0.0 in out_gains else both(
        lambda f, j: side_gain(f.h_out, j.h_out, block_out, sigma, 0.0, f"{name} (H_out)"))
    ldlq = None
    if a.xtx is not None and b.xtx is not None:
        ldlq = both(lambda f, j: side_gain(f.xtx, judges[id(j)], block_in, sigma, 0.0, f"{name} (xxᵀ)"))
    return CrossFit(shrink=best, out_gains=out_gains, in_gain=in_gain, yaqa=out_gains[best] * in_gain,
                    yaqa_raw=raw_out * in_gain, ldlq=ldlq)
