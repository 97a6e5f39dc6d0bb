"""Predicted linearity coefficients from the Kronecker factors (units of α_noise: mean per-token ΔKL per unit t²).

Per token, the layer's Fisher is F ≈ c·H_O ⊗ H_I with c fixed by its trace per token, the whole windows'
gradients' Σ_w‖G_w‖² / tokens (factors.py: chunks shorter than the window would drop the cross-token terms):
c = (Σ_w‖G_w‖² / tokens) / (tr H_O · tr H_I). An isotropic error of relative size t² (E[ΔW ΔWᵀ] per entry
t²‖W‖²/mn) then costs

    round-to-nearest:   ½ c (‖W‖²/mn) tr H_O tr H_I · t²  = ½ (‖W‖²/mn) (Σ_w‖G_w‖² / tokens) · t²
    two-sided LDLQ:     ½ c' (‖W‖²/mn) tr D_O tr D_I · t² = α_shaped · gain,   c' = (Σ_c‖G_c‖² / tokens) / (tr H_O tr H_I)

gain = (tr D_O / tr H_O)(tr D_I / tr H_I) on the normalized factors.
The two scales differ on purpose. The whole window's Fisher has cross-token terms the per-chunk factors lack,
and an isotropic error pays for them (noise injection agrees with c, not c'). The error adaptive rounding leaves
does not: measured layer by layer on held-out calibration text (README, "Which Fisher scale"), its ΔKL follows
the factors' own scale c', and c would overstate it (v_proj's ~2×), because the cross-token mass lies along the
inputs' dominant shared directions, which the rounding keeps the error out of. So α_shaped = α_hessian · c'/c,
and every α after adaptive rounding (α_yaqa, the held-out forecasts) is α_shaped · gain. In-sample (LDL and judgement on the same
factors) the gain is wildly optimistic with small calibration (DESIGN.md); the held-out gain fits the LDL on
one calibration half and judges it under the other, both ways, and averages the two.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..heldout import DEFAULT_SHRINK_TARGET, RotatedHalf, crossfit, rotate_factor, rotated_target
from ..linalg import LDL, LDLSettings, block_ldl, normalize
from .hessians import LayerFactors
from .relerr import rotation_seeds


@dataclass
class Coefficients:
    trace_h_in: float          # of the summed (both halves) factor, as accumulated (a sum over chunks)
    trace_h_out: float
    grad_sq_per_token: float   # Σ_w ‖G_w‖² / tokens over whole windows (Σ_c ‖G_c‖² / tokens in older profiles)
    grad_sq_per_sample: float  # E_c ‖G_c‖²
    c: float                   # Kronecker scale: F per token ≈ c · H_O ⊗ H_I
    alpha_hessian: float       # round-to-nearest (an isotropic error), at the whole windows' scale c
    alpha_shaped: float        # the same at the factors' own scale c': what adaptive rounding's gains multiply
    yaqa_gain: float           # in-sample, raw factors (λ = 0)
    alpha_yaqa: float
    yaqa_gain_heldout: float | None       # cross-fitted, factors shrunk by the chosen λs (`apply --shrink auto`)
    alpha_yaqa_heldout: float | None
    yaqa_gain_heldout_raw: float | None   # cross-fitted, λ = 0
    ldlq_gain_heldout: float | None       # one-sided LDLQ (H_I = Σxxᵀ), cross-fitted
    shrink_out: float | None              # λ of H_O chosen by the held-out gain
    shrink_in: float | None               # λ of H_I, likewise
    shrink_target: str | None             # what both were shrunk toward
    shrink_gains: dict[float, float] | None     # λ → held-out H_O-side gain
    shrink_in_gains: dict[float, float] | None  # λ → held-out H_I-side gain
    sigma_in: float            # damping the in-sample LDL needed (fraction of the mean diagonal)
    sigma_out: float


def rtn_alpha(c: float, weight_sq_norm: float, m: int, n: int, trace_out: float, trace_in: float) -> float:
    return 0.5 * c * weight_sq_norm / (m * n) * trace_out * trace_in


def rotated_halves(f: LayerFactors, target: str = DEFAULT_SHRINK_TARGET,
                   with_xtx: bool = True) -> tuple[RotatedHalf, RotatedHalf]:
    """Both calibration halves of a layer, rotated into the basis its weights are rounded in (LDL is not
    rotation-invariant), with their shrinkage targets; Σxxᵀ only `with_xtx` (for the LDLQ figure)."""
    seed_out, seed_in = rotation_seeds(f.name)

    def rotated(half: str) -> RotatedHalf:
        ho, hi, xtx = f.half(half)
        return RotatedHalf(rotate_factor(ho, seed_out), rotate_factor(hi, seed_in),
                           None if xtx is None or not with_xtx else rotate_factor(xtx, seed_in),
                           rotated_target(ho, seed_out, target), rotated_target(hi, seed_in, target))
    return rotated("a"), rotated("b")


def layer_coefficients(f: LayerFactors, weight_sq_norm: float, *, ldl: LDLSettings = LDL,
                       target: str = DEFAULT_SHRINK_TARGET) -> Coefficients:
    """Coefficients of one layer; LDL-based gains are computed in the layer's rotated basis, as apply rounds."""
    m, n = f.h_out_a.shape[0], f.h_in_a.shape[0]
    h_out, h_in = f.h_out, f.h_in
    tr_out, tr_in = float(torch.trace(h_out)), float(torch.trace(h_in))
    window_sq = f.grad_sq if f.window_grad_sq is None else f.window_grad_sq
    per_token = window_sq / f.tokens
    c = per_token / (tr_out * tr_in)
    alpha = rtn_alpha(c, weight_sq_norm, m, n, tr_out, tr_in)
    shaped = alpha * f.grad_sq / window_sq

    seed_out, seed_in = rotation_seeds(f.name)

    def ldl_of(H: torch.Tensor, seed: int, side: str):
        return block_ldl(normalize(rotate_factor(H, seed)), ldl.block, sigma=ldl.sigma, name=f"{f.name} ({side})")

    ldl_out, ldl_in = ldl_of(h_out, seed_out, "H_out"), ldl_of(h_in, seed_in, "H_in")
    gain = (ldl_out.trace_d / m) * (ldl_in.trace_d / n)  # a normalized factor has trace = dimension

    cf = crossfit(*rotated_halves(f, target), ldl, name=f.name) \
        if f.samples_a > 0 and f.samples_b > 0 else None
    return Coefficients(
        trace_h_in=tr_in, trace_h_out=tr_out, grad_sq_per_token=per_token,
        grad_sq_per_sample=f.grad_sq / max(f.samples, 1), c=c, alpha_hessian=alpha, alpha_shaped=shaped,
        yaqa_gain=gain, alpha_yaqa=shaped * gain,
        yaqa_gain_heldout=cf and cf.yaqa, alpha_yaqa_heldout=cf and shaped * cf.yaqa,
        yaqa_gain_heldout_raw=cf and cf.yaqa_raw, ldlq_gain_heldout=cf and cf.ldlq,
        shrink_out=cf and cf.shrink, shrink_in=cf and cf.shrink_in, shrink_target=cf and target,
        shrink_gains=cf and {str(k): v for k, v in cf.out_gains.items()},
        shrink_in_gains=cf and {str(k): v for k, v in cf.in_gains.items()},
        sigma_in=ldl_in.sigma, sigma_out=ldl_out.sigma)
