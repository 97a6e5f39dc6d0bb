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

from dataclasses import dataclass, field

import torch

from .errors import BitplanError
from .formats import RandomizedHadamard
from .linalg import LDL, LDLSettings, damped_cholesky, normalize

# λ = 0 is the raw sketch, λ = 1 the target alone. DESIGN.md's grid plus 0, so that large calibration can choose
# the raw factor.
SHRINK_GRID = (0.0, 0.1, 0.3, 0.6, 0.8, 1.0)
# What a factor is shrunk toward: "identity" (I after normalization, DESIGN.md; λ = 1 on H_O is one-sided LDLQ) or
# "diagonal" (the factor's own diagonal in the original basis, rotated like the factor: the best-estimated part of
# a noisy factor, which keeps which channels matter more). The diagonal wins on the held-out calibration half but
# lost on other text (README, "Shrinkage"): which channels matter is a property of the calibration text.
SHRINK_TARGETS = ("identity", "diagonal")
DEFAULT_SHRINK_TARGET = "identity"


def rotate_factor(H: torch.Tensor, seed: int | None) -> torch.Tensor:
    """R H Rᵀ for the randomized Hadamard R of `seed` (the factor seen by weights rotated with that seed);
    seed None: H itself (float64), for formats quantized unrotated (ggml's)."""
    if seed is None:
        return H.to(torch.float64)
    had = RandomizedHadamard(H.shape[0], seed)
    return had.forward(had.forward(H.to(torch.float64), dim=0), dim=1)


def shrink(Hn: torch.Tensor, lam: float, target: torch.Tensor | None = None) -> torch.Tensor:
    """(1 − λ)·H + λ·T of a normalized factor; T = I when no target is given."""
    if lam == 0.0:
        return Hn
    T = torch.eye(Hn.shape[0], dtype=Hn.dtype, device=Hn.device) if target is None else target.to(Hn.dtype)
    return (1.0 - lam) * Hn + lam * T


def check_target(target: str) -> str:
    if target not in SHRINK_TARGETS:
        raise BitplanError(f"unknown shrinkage target {target!r}; choose one of {', '.join(SHRINK_TARGETS)}")
    return target


def rotated_target(H: torch.Tensor, seed: int | None, target: str) -> torch.Tensor | None:
    """The shrinkage target of a factor H given in the original basis, rotated like `rotate_factor(H, seed)`, at
    H's scale (so `normalize` of the two agree: rotation keeps the trace). None stands for the identity; seed None
    leaves it unrotated."""
    if check_target(target) == "identity":
        return None
    return rotate_factor(torch.diag(H.to(torch.float64).diagonal()), seed)


def normalized_pair(H: torch.Tensor, T: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """normalize(H), and T scaled by the same factor (mean diagonal of H → 1)."""
    H = H.to(torch.float64)
    Hn = normalize(H)  # raises its clear error for a factor accumulated from nothing
    return Hn, None if T is None else T.to(torch.float64) / H.diagonal().mean()


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
        eye = torch.eye(Hn.shape[0], dtype=Hn.dtype, device=Hn.device)
        for eps in (1e-10, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3):
            chol, info = torch.linalg.cholesky_ex(Hn + eps * eye)
            if int(info) == 0:
                break
        else:
            raise BitplanError("a calibration half's Hessian factor is far from positive semi-definite "
                               "(non-finite or corrupted statistics)")
        return cls(chol=chol, trace=float(Hn.diagonal().sum()))


def side_gain(H_fit: torch.Tensor | None, judge: "Judge | torch.Tensor", ldl: LDLSettings = LDL,
              lam: float = 0.0, name: str = "a layer", target: torch.Tensor | None = None) -> float:
    """tr(L⁻¹ H L⁻ᵀ) / tr(H) for L from the block LDL of normalize(H_fit) shrunk by λ toward `target` (at
    H_fit's scale; None: I), judged under H. H_fit None, or λ = 1 toward I: L = I, round-to-nearest on this
    side, gain 1.

    With the damped fit's Cholesky C (L = C·blockdiag(C_ii)⁻¹) and H = C_J C_Jᵀ:
    tr(L⁻¹ H L⁻ᵀ) = ‖blockdiag(C_ii) · C⁻¹ C_J‖²_F, one triangular solve.
    """
    if H_fit is None or (lam == 1.0 and target is None):
        return 1.0
    if not isinstance(judge, Judge):
        judge = Judge.of(judge)
    n = judge.chol.shape[0]
    Hn, T = normalized_pair(H_fit, target)
    C = damped_cholesky(shrink(Hn, lam, T), sigma=ldl.sigma, name=name).chol
    block = ldl.block
    Y = torch.linalg.solve_triangular(C, judge.chol, upper=False).view(n // block, block, n)
    diag = torch.stack([C[i:i + block, i:i + block] for i in range(0, n, block)])
    return float((diag @ Y).pow(2).sum()) / judge.trace


@dataclass
class RotatedHalf:
    """One calibration half of a layer's factors, rotated into the rounding basis, with each factor's shrinkage
    target (`rotated_target`; None: the identity)."""
    h_out: torch.Tensor
    h_in: torch.Tensor
    xtx: torch.Tensor | None
    t_out: torch.Tensor | None = None
    t_in: torch.Tensor | None = None


@dataclass
class Shrinkage:
    """λ of each factor of one layer (H_O, H_I), what both are shrunk toward, and, when the held-out gain chose
    them, every λ's gain on each side."""
    out: float
    inp: float
    target: str = DEFAULT_SHRINK_TARGET
    out_gains: dict[float, float] = field(default_factory=dict)
    in_gains: dict[float, float] = field(default_factory=dict)
    samples: int | None = None    # the factor samples (both halves) they were chosen on; None: not from factors

    def stats(self) -> dict:
        """What a checkpoint records of the shrinkage a layer was rounded with."""
        return {"shrink_out": self.out, "shrink_in": self.inp, "shrink_target": self.target,
                **({"shrink_gains": {str(k): v for k, v in self.out_gains.items()},
                    "shrink_in_gains": {str(k): v for k, v in self.in_gains.items()}} if self.out_gains else {})}


@dataclass
class CrossFit:
    """Held-out gains of a layer (expected proxy ÷ round-to-nearest's, judged under the Fisher factors)."""
    shrink: float                     # λ of H_O with the smallest held-out H_O-side gain
    shrink_in: float                  # λ of H_I, likewise (the two sides' gains multiply: chosen separately)
    out_gains: dict[float, float]     # λ → held-out H_O-side gain
    in_gains: dict[float, float]      # λ → held-out H_I-side gain
    yaqa: float                       # two-sided, at the chosen λs
    yaqa_raw: float                   # two-sided, λ = 0 on both sides
    ldlq: float | None                # one-sided LDLQ with H_I = Σxxᵀ (None without xtx)

    @property
    def in_gain(self) -> float:
        return self.in_gains[self.shrink_in]

    def shrinkage(self, target: str, samples: int | None = None) -> Shrinkage:
        return Shrinkage(self.shrink, self.shrink_in, target, self.out_gains, self.in_gains, samples)


def both_ways(fn, a, b) -> float:
    """½ (fn(a → b) + fn(b → a)): fit on one half, judge on the other, and the other way round."""
    return 0.5 * (fn(a, b) + fn(b, a))


def shrink_gains(h_a: torch.Tensor, h_b: torch.Tensor, ldl: LDLSettings = LDL,
                 grid: tuple[float, ...] = SHRINK_GRID, name: str = "a layer",
                 targets: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
                 judges: tuple[Judge, Judge] | None = None) -> dict[float, float]:
    """λ → held-out gain on one side of the factor shrunk toward its target; h_a, h_b are one factor's two
    calibration halves (rotated), `judges` their prepared `Judge`s when the caller has them already."""
    j_a, j_b = judges or (Judge.of(h_a), Judge.of(h_b))
    a, b = (h_a, targets[0], j_a), (h_b, targets[1], j_b)
    return {lam: both_ways(lambda f, j: side_gain(f[0], j[2], ldl, lam, name, f[1]), a, b) for lam in grid}


def best_lambda(gains: dict[float, float], grid: tuple[float, ...] = SHRINK_GRID) -> float:
    """The λ on `grid` with the smallest gain; ties go to the smaller λ."""
    return min(grid, key=lambda lam: (gains[lam], lam))


def choose_shrink(h_a: torch.Tensor, h_b: torch.Tensor, ldl: LDLSettings = LDL,
                  grid: tuple[float, ...] = SHRINK_GRID, name: str = "a layer",
                  targets: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
                  ) -> tuple[float, dict[float, float]]:
    """The λ on `grid` whose factor, shrunk toward its target, has the smallest held-out gain on its side, and
    every λ's gain. (The other side multiplies every λ's two-sided gain by the same number, so it does not enter
    the choice.)"""
    gains = shrink_gains(h_a, h_b, ldl, grid, name, targets)
    return best_lambda(gains, grid), gains


def crossfit(a: RotatedHalf, b: RotatedHalf, ldl: LDLSettings = LDL,
             grid: tuple[float, ...] = SHRINK_GRID, grid_in: tuple[float, ...] = SHRINK_GRID,
             name: str = "a layer") -> CrossFit:
    """Held-out gains both ways (a → b, b → a, averaged) and the shrinkage λ of each factor that minimizes them."""
    # λ = 0 is always judged (the raw figure), but chosen only when it is on the grid asked for
    def with_raw(g: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(sorted({0.0, *g}))

    in_judges = (Judge.of(a.h_in), Judge.of(b.h_in))  # H_I judges both the sketch's and Σxxᵀ's LDL
    out_gains = shrink_gains(a.h_out, b.h_out, ldl, with_raw(grid), f"{name} (H_out)",
                             (a.t_out, b.t_out))
    in_gains = shrink_gains(a.h_in, b.h_in, ldl, with_raw(grid_in), f"{name} (H_in)",
                            (a.t_in, b.t_in), in_judges)
    lam_out, lam_in = best_lambda(out_gains, grid), best_lambda(in_gains, grid_in)
    ldlq = None
    if a.xtx is not None and b.xtx is not None:
        ldlq = 0.5 * (side_gain(a.xtx, in_judges[1], ldl, 0.0, f"{name} (xxᵀ)")
                      + side_gain(b.xtx, in_judges[0], ldl, 0.0, f"{name} (xxᵀ)"))
    return CrossFit(shrink=lam_out, shrink_in=lam_in, out_gains=out_gains, in_gains=in_gains,
                    yaqa=out_gains[lam_out] * in_gains[lam_in], yaqa_raw=out_gains[0.0] * in_gains[0.0], ldlq=ldlq)
