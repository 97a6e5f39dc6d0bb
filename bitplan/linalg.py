"""Factor preprocessing shared by profile (predicted gains) and apply (YAQA rounding).

All routines work in float64: the block LDL of a damped, nearly singular factor loses digits fast in float32.
A factor is first normalized to mean diagonal 1, so that the damping σ·I is relative (σ = 0.01 is 1 % of the
mean diagonal), then damped until Cholesky succeeds, then split into H = L D Lᵀ with L unit block-lower-triangular.
The block size and the damping step are `LDLSettings`; `LDL` is the one set profile and apply both use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import BitplanError


@dataclass(frozen=True)
class LDLSettings:
    """Block size and damping step of the block LDL. The profile's predicted gains are made with the same
    settings apply rounds with, and profile.json records them (`ldl_block`, `ldl_sigma`)."""
    block: int = 16        # rows/columns per diagonal block of D: the tiles of YAQA and QTIP
    sigma: float = 0.01    # damping step, a fraction of the normalized factor's mean diagonal


LDL = LDLSettings()


def normalize(H: torch.Tensor) -> torch.Tensor:
    """H / mean(diag H): scale-free, so damping and traces compare across layers and calibration sizes."""
    mean_diag = H.diagonal().mean()
    if not torch.isfinite(mean_diag) or mean_diag <= 0:
        raise BitplanError(f"a Hessian factor has mean diagonal {float(mean_diag):.3g}; "
                           "it was accumulated from no data or from non-finite gradients")
    return H / mean_diag


@dataclass
class DampedCholesky:
    chol: torch.Tensor     # lower-triangular C with C Cᵀ = H + sigma·I
    sigma: float           # total damping added (a multiple of the step)


def damped_cholesky(H: torch.Tensor, sigma: float = LDL.sigma, max_tries: int = 40,
                    name: str = "a layer", overwrite: bool = False) -> DampedCholesky:
    """Cholesky of H + k·σ·I for the smallest k = 1, 2, … that succeeds (YAQA's adaptive damping).

    H should be normalized first: σ is added as an absolute amount. Raises BitplanError naming `name`
    when max_tries steps are not enough (the factor is then not positive semi-definite in any useful sense).
    `overwrite`: H (float64) may be overwritten, so the work needs one n × n buffer besides the result, not two.
    """
    if overwrite and H.dtype == torch.float64:
        S = symmetrize_(H)
    else:
        H = H.to(torch.float64)
        S = H + H.T
        S /= 2                  # (H + Hᵀ)/2 in one n × n buffer
    diagonal = S.diagonal().clone()
    for k in range(1, max_tries + 1):
        S.diagonal().copy_(diagonal + k * sigma)   # S + kσ·I in place: the same values as adding an identity
        chol, info = torch.linalg.cholesky_ex(S)
        if int(info) == 0:
            return DampedCholesky(chol=chol, sigma=k * sigma)
        del chol
    raise BitplanError(f"Hessian factor of {name} stays indefinite after damping by {max_tries * sigma:g}·I; "
                       "its calibration statistics are broken (non-finite or far from positive semi-definite)")


def symmetrize_(H: torch.Tensor, tile: int = 1024) -> torch.Tensor:
    """H ← (H + Hᵀ)/2 in place, a pair of tiles at a time (the same values as the out-of-place sum)."""
    n = H.shape[0]
    for i in range(0, n, tile):
        for j in range(0, i + 1, tile):
            lower, upper = H[i:i + tile, j:j + tile], H[j:j + tile, i:i + tile]
            mean = lower + upper.T
            mean /= 2
            lower.copy_(mean)
            upper.copy_(mean.T)
    return H


@dataclass
class BlockLDL:
    L: torch.Tensor        # n×n, unit block-lower-triangular (identity diagonal blocks)
    D: torch.Tensor        # [n/block, block, block], symmetric positive definite diagonal blocks
    sigma: float           # damping that was needed

    @property
    def trace_d(self) -> float:
        return float(self.D.diagonal(dim1=-2, dim2=-1).sum())

    def dense_d(self) -> torch.Tensor:
        return torch.block_diag(*self.D)


def block_ldl(H: torch.Tensor, block: int = LDL.block, *, sigma: float = LDL.sigma, max_tries: int = 40,
              name: str = "a layer", damp: bool = True, overwrite: bool = False) -> BlockLDL:
    """H (+ damping) = L D Lᵀ with L unit block-lower-triangular and D block-diagonal (blocks of `block`).

    From Cholesky H = C Cᵀ: D_i = C_ii C_iiᵀ and L = C · blockdiag(C_ii)⁻¹, computed in C's own buffer. With
    damp=False, H must already be positive definite (sigma is then 0). `overwrite`: H (float64) may be
    overwritten (see damped_cholesky), so the peak is two n × n buffers, H and L.
    """
    n = H.shape[0]
    if H.shape != (n, n):
        raise BitplanError(f"{name}: a Hessian factor must be square, got {tuple(H.shape)}")
    if n % block:
        raise BitplanError(f"{name}: dimension {n} is not a multiple of the LDL block {block}")
    if damp:
        dc = damped_cholesky(H, sigma=sigma, max_tries=max_tries, name=name, overwrite=overwrite)
        C, total = dc.chol, dc.sigma
    else:
        C, info = torch.linalg.cholesky_ex(((H + H.T) / 2).to(torch.float64))
        if int(info):
            raise BitplanError(f"{name}: Hessian factor is not positive definite")
        total = 0.0
    nb = n // block
    Cb = C.view(nb, block, nb, block)
    diag = torch.stack([Cb[i, :, i, :] for i in range(nb)])                     # [nb, b, b] lower-triangular
    eye = torch.eye(block, dtype=C.dtype, device=C.device).expand(nb, block, block)
    inv = torch.linalg.solve_triangular(diag, eye, upper=False)                 # C_ii⁻¹
    L = C
    for j in range(nb):   # block column j of C times C_jj⁻¹, in place; its rows above block j are zero
        cols = slice(j * block, (j + 1) * block)
        L[j * block:, cols] = L[j * block:, cols] @ inv[j]
    Lb = L.view(nb, block, nb, block)
    for i in range(nb):  # exactly I (C_ii C_ii⁻¹ is I only up to rounding): no feedback inside a tile
        Lb[i, :, i, :] = torch.eye(block, dtype=C.dtype, device=C.device)
    D = diag @ diag.transpose(-1, -2)
    return BlockLDL(L=L, D=D, sigma=total)


def ldl_gain(H: torch.Tensor, ldl: LDLSettings = LDL, name: str = "a layer") -> float:
    """tr(D) / tr(H) for the normalized factor: the expected error of block LDLQ relative to round-to-nearest,
    on one side, judged in-sample (on the same factor the LDL was computed from)."""
    Hn = normalize(H.to(torch.float64))
    return block_ldl(Hn, ldl.block, sigma=ldl.sigma, name=name).trace_d / float(Hn.diagonal().sum())


def relative_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """‖W − Ŵ‖² / ‖W‖² in float64, a block of rows at a time (a 128256-row embedding needs no float64 copy)."""
    return relative_error_of_blocks([(W, W_hat)])


def relative_error_of_blocks(blocks, block_bytes: int = 16 * 2 ** 20) -> float:
    """relative_error over (W, Ŵ) pairs of row blocks (e.g. a weight read from its file a block at a time), each
    taken in float64 a few rows at a time: about four float64 copies of `block_bytes` at once."""
    num = den = 0.0
    for W, W_hat in blocks:
        a, b = error_sums(W, W_hat, block_bytes)
        num, den = num + a, den + b
    return num / max(den, 1e-300)


def error_sums(W: torch.Tensor, W_hat: torch.Tensor, block_bytes: int = 16 * 2 ** 20) -> tuple[float, float]:
    """(‖W − Ŵ‖², ‖W‖²) in float64, a few rows at a time."""
    num = den = 0.0
    rows = max(1, block_bytes // (8 * max(1, W[0].numel() if W.dim() > 1 else 1)))
    for r in range(0, W.shape[0], rows):
        w = W[r:r + rows].to(torch.float64)
        num += float((w - W_hat[r:r + rows].to(torch.float64)).pow(2).sum())
        den += float(w.pow(2).sum())
    return num, den
