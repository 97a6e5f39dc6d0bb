"""Adaptive rounding with feedback through Kronecker-factored Hessians: two-sided block LDLQ (YAQA).

With H_O = L_O D_O L_Oᵀ and H_I = L_I D_I L_Iᵀ (unit block-lower L, block-diagonal D) and E = W − Ŵ
(zero on tiles not yet rounded), tile (i, j) is rounded from

    T_ij = W_ij + [ L_Oᵀ E L_I − E ]_ij ,      Ŵ_ij = Q(T_ij)

in anti-diagonal wavefronts from the bottom-right tile: tile (i, j) needs every tile (k, l) with k ≥ i, l ≥ j,
and those all lie on later anti-diagonals, so the tiles of one wavefront are independent and are rounded as one
batch. Then exactly  tr(H_O E H_I Eᵀ) = Σ_ij tr((T_ij − Ŵ_ij)ᵀ D_O,i (T_ij − Ŵ_ij) D_I,j)  (see `proxy_by_tiles`).

L_O = I is one-sided LDLQ (GPTQ's update); L_O = L_I = I is round-to-nearest.

Cost: we keep M = E L_I up to date (each rounded tile adds E_ij L_I[j, :] to its row block), so a tile's
feedback is M_ij + L̄_O[:, i]ᵀ M[:, j]: in all m·n·(m + n) flops per layer, in m/b_O + n/b_I batched steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BitplanError
from ..formats import Format
from ..linalg import BlockLDL


@dataclass
class Rounded:
    codes: torch.Tensor        # [m, n / p] codes of the format
    W_hat: torch.Tensor        # [m, n] the dequantized weights (same basis as the input W)
    T: torch.Tensor | None     # [m, n] the targets each tile was rounded from (for the error identity)


def ldlq_round(W: torch.Tensor, fmt: Format, scale: torch.Tensor, zero: torch.Tensor | None,
               L_in: torch.Tensor | None, L_out: torch.Tensor | None,
               block_in: int, block_out: int, keep_targets: bool = True) -> Rounded:
    """Round W [m, n] to `fmt` with fixed per-weight `scale`/`zero` [m, n], feedback through L_in [n, n] and
    L_out [m, m] (unit block-lower-triangular with blocks block_in / block_out; None means identity).
    `keep_targets` False leaves Rounded.T None: one m × n buffer less."""
    m, n = W.shape
    p = fmt.vector_dim
    if n % block_in or m % block_out:
        raise BitplanError(f"a {m}×{n} layer does not split into {block_out}×{block_in} tiles")
    if block_in % p:
        raise BitplanError(f"tile width {block_in} is not a multiple of {fmt.name}'s vector length {p}")
    dtype = W.dtype
    nbr, nbc = m // block_out, n // block_in
    M = torch.zeros_like(W)          # E · L_in, kept current (E itself is never needed whole)
    T = torch.empty_like(W) if keep_targets else None
    W_hat = torch.empty_like(W)
    codes = torch.empty(m, n // p, dtype=torch.int32, device=W.device)
    L_out = L_out.to(W.device, dtype) if L_out is not None else None
    L_in = L_in.to(W.device, dtype) if L_in is not None else None

    for d in range(nbr + nbc - 2, -1, -1):
        i = torch.arange(max(0, d - nbc + 1), min(nbr - 1, d) + 1, device=W.device)
        j = d - i
        pairs = list(zip(i.tolist(), j.tolist()))
        tile = lambda X: X.view(nbr, block_out, nbc, block_in)[i, :, j, :]  # noqa: E731  [k, b_O, b_I]
        F = tile(M)
        if L_out is not None:
            # Tile by tile, in place: batched, the gathered operands would be several m × n-sized buffers.
            # L̄_O = L_O − I: its column block a is zero down to row block a, and below that it is L_O's.
            for t, (a, b) in enumerate(pairs):
                below = slice((a + 1) * block_out, m)
                F[t] += L_out[below, a * block_out:(a + 1) * block_out].T @ M[below, b * block_in:(b + 1) * block_in]
        W_t = tile(W)
        T_t = W_t + F
        s_t = tile(scale)
        z_t = tile(zero) if zero is not None else None
        c_t = fmt.encode(T_t, s_t, z_t)
        Q_t = fmt.decode(c_t, s_t, z_t).to(dtype)
        E_t = W_t - Q_t
        # Scatter the wavefront's tiles back into the full matrices.
        view = lambda X: X.view(nbr, block_out, nbc, block_in)  # noqa: E731
        if T is not None:
            view(T)[i, :, j, :] = T_t
        view(W_hat)[i, :, j, :] = Q_t
        codes.view(nbr, block_out, nbc, block_in // p)[i, :, j, :] = c_t.to(torch.int32)
        if L_in is not None:
            for t, (a, b) in enumerate(pairs):   # L_I's row block b is zero right of column block b
                left = slice(0, (b + 1) * block_in)
                M[a * block_out:(a + 1) * block_out, left].addmm_(E_t[t], L_in[b * block_in:(b + 1) * block_in, left])
        else:
            view(M)[i, :, j, :] += E_t
    return Rounded(codes=codes, W_hat=W_hat, T=T)


def proxy(E: torch.Tensor, H_in: torch.Tensor | None, H_out: torch.Tensor | None) -> float:
    """tr(H_O E H_I Eᵀ) (identity where a factor is None)."""
    left = E if H_out is None else H_out @ E
    right = E if H_in is None else E @ H_in
    return float((left * right).sum())


def factor_product(ldl: BlockLDL, X: torch.Tensor, left: bool) -> torch.Tensor:
    """H X (`left`) or X H for the factor H = L D Lᵀ − σ·I that `ldl` split (σ its damping: H as it was before
    damping), with one temporary of X's size besides the result (no transposed copies)."""
    nb, b, _ = ldl.D.shape
    L, D = ldl.L.to(X.dtype), ldl.D.to(X.dtype)
    P = L.T @ X if left else X @ L
    for j in range(nb):   # blockdiag(D) ·, in place
        blk = slice(j * b, (j + 1) * b)
        if left:
            P[blk] = D[j] @ P[blk]
        else:
            P[:, blk] = P[:, blk] @ D[j]
    Y = L @ P if left else P @ L.T
    del P
    return Y.sub_(X, alpha=ldl.sigma) if ldl.sigma else Y


def proxy_from_ldl(E: torch.Tensor, ldl_in: BlockLDL | None, ldl_out: BlockLDL | None,
                   block_bytes: int = 16 * 2 ** 20) -> float:
    """proxy(E, H_I, H_O) from the factors' block LDLs (identity where None), so that the n × n factors need not
    be kept beside their L: at most three m × n buffers besides E."""
    right = E if ldl_in is None else factor_product(ldl_in, E, left=False)      # E H_I
    left = E if ldl_out is None else factor_product(ldl_out, E, left=True)     # H_O E
    rows = max(1, block_bytes // (8 * E.shape[1]))
    return float(sum((left[r:r + rows] * right[r:r + rows]).sum() for r in range(0, E.shape[0], rows)))


def proxy_by_tiles(T: torch.Tensor, W_hat: torch.Tensor, D_in: torch.Tensor, D_out: torch.Tensor) -> float:
    """Σ_ij tr(R_ijᵀ D_O,i R_ij D_I,j) with R = T − Ŵ, from the block-diagonal LDL factors [nb, b, b]."""
    nbr, bo, _ = D_out.shape
    nbc, bi, _ = D_in.shape
    R = (T - W_hat).view(nbr, bo, nbc, bi).permute(0, 2, 1, 3)                       # [i, j, b_O, b_I]
    left = torch.einsum("iab,ijbc->ijac", D_out.to(R.dtype), R)
    right = torch.einsum("ijac,jcd->ijad", R, D_in.to(R.dtype))
    return float((left * right).sum())
