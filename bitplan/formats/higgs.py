"""Grid formats `higgs-p{p}-n{n}-g{g}`: RMS-scaled groups, p-vectors snapped to an n-point Gaussian grid.

The caller rotates W on both sides first (randomized Hadamard), so entries are ≈ i.i.d. Gaussian and the
error per entry is the grid's Gaussian MSE times the group's mean square. Each group of g entries along the
input dimension gets s = ‖w_group‖ / √len (fp16); each run of p consecutive entries of a row, divided
elementwise by their scales, is replaced by its nearest grid point (exact search, see grids.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..errors import BitplanError
from .base import Format, GroupParams, check_finite, check_matrix, pad_cols, to_fp16_values
from .grids import grid_encoder, grid_table


@dataclass
class NormalizedWeight:
    """A weight's per-weight RMS group scales and its entries divided by them, as p-vectors: what every grid
    format of one group size and vector dimension encodes (the profile measures ~28 grids on the same ones)."""
    shape: tuple[int, int]     # (m, n) of the weight
    group_size: int
    vector_dim: int
    scale: torch.Tensor        # [m, width] float32 (fp16 values), width = n padded to a multiple of p
    z: torch.Tensor            # [m · width / p, p] float64


def _check_tile(T: torch.Tensor, scale: torch.Tensor | None, p: int, name: str) -> None:
    if not isinstance(T, torch.Tensor) or T.dim() < 1:
        raise BitplanError(f"{name}: expected a tensor with a last dim to quantize")
    if T.shape[-1] % p:
        raise BitplanError(f"{name}: last dim {T.shape[-1]} is not a multiple of the vector size {p}; "
                           "tiles must hold whole vectors")
    if scale is None or tuple(scale.shape) != tuple(T.shape):
        got = None if scale is None else tuple(scale.shape)
        raise BitplanError(f"{name}: needs a per-weight scale of shape {tuple(T.shape)} (see per_weight), got {got}")


@dataclass(frozen=True)
class GridFormat(Format):
    levels: int = 0  # number of grid points n
    # Ties between equidistant codes go to the lowest index, as a brute-force search settles them (codes are then
    # a function of the values alone). False: the k-d tree settles them, 1.3-1.8x faster (`for_measuring`).
    exact_ties: bool = True

    @classmethod
    def make(cls, p: int, n: int, g: int, mse_q: float) -> "GridFormat":
        return cls(
            name=f"higgs-p{p}-n{n}-g{g}", kind="grid", nominal_bits=math.log2(n) / p, group_size=g, vector_dim=p,
            code_bits=int(math.log2(n)), mse_q=mse_q, rotated=True, codebook_bits=32 * n * p, levels=n,
        )

    def for_measuring(self) -> "GridFormat":
        return replace(self, exact_ties=False)

    def codebook(self) -> torch.Tensor:
        return torch.from_numpy(grid_table(self.vector_dim, self.levels).copy())

    def fit(self, W: torch.Tensor, importance: torch.Tensor | None = None) -> GroupParams:
        check_matrix(W)
        m, n = W.shape
        g = self.group_size
        G = math.ceil(n / g)
        W64 = W.detach().to(torch.float64)
        padded = torch.cat([W64, W64.new_zeros(m, G * g - n)], dim=1) if G * g != n else W64
        sq = padded.reshape(m, G, g).pow(2).sum(-1)
        lens = torch.full((G,), float(g), dtype=torch.float64)
        lens[-1] = n - (G - 1) * g
        return GroupParams(to_fp16_values((sq / lens).sqrt(), "group RMS scale"), None)

    def _normalized(self, T: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        # float64 so the code depends only on the values, not on a float32 rounding of T / s
        s = scale.detach().to(torch.float64)
        z = T.detach().to(torch.float64) / torch.where(s == 0, 1.0, s)
        return torch.where(s == 0, 0.0, z)

    def normalize(self, W: torch.Tensor) -> NormalizedWeight:
        """W's scales and normalized vectors, exactly as `quantize` computes them before the grid search."""
        check_matrix(W)
        m, n = W.shape
        scale, _ = self.per_weight(self.fit(W), n)
        width = math.ceil(n / self.vector_dim) * self.vector_dim
        T, scale = pad_cols(W, width, "zero"), pad_cols(scale, width, "edge")
        z = self._normalized(T, scale).reshape(-1, self.vector_dim)
        return NormalizedWeight((m, n), self.group_size, self.vector_dim, scale, z)

    def round_normalized(self, nw: NormalizedWeight) -> torch.Tensor:
        """dequantize(quantize(W)) [m, n] from `normalize(W)` of this format's group size and vector dimension
        (any grid size): the same values, without fitting the scales again."""
        if (nw.group_size, nw.vector_dim) != (self.group_size, self.vector_dim):
            raise BitplanError(f"{self.name}: weights normalized for groups of {nw.group_size} and vectors of "
                               f"{nw.vector_dim}, not {self.group_size} and {self.vector_dim}")
        codes = torch.from_numpy(grid_encoder(self.vector_dim, self.levels).encode(nw.z, self.exact_ties))
        return self.decode(codes.reshape(nw.scale.shape[0], -1), nw.scale)[:, :nw.shape[1]]

    def encode(self, T: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None = None) -> torch.Tensor:
        _check_tile(T, scale, self.vector_dim, self.name)
        check_finite(T, f"{self.name}: input")
        p = self.vector_dim
        z = self._normalized(T, scale).reshape(-1, p)
        codes = grid_encoder(p, self.levels).encode(z.cpu(), exact_ties=self.exact_ties)
        return torch.from_numpy(codes).to(torch.int32).reshape(*T.shape[:-1], T.shape[-1] // p).to(T.device)

    def decode(self, codes: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None = None) -> torch.Tensor:
        p = self.vector_dim
        if scale is None or tuple(scale.shape) != (*codes.shape[:-1], codes.shape[-1] * p):
            raise BitplanError(f"{self.name}: decode needs a per-weight scale of shape "
                               f"{(*codes.shape[:-1], codes.shape[-1] * p)}")
        cb = self.codebook().to(codes.device)
        vals = cb[codes.long()].reshape(scale.shape)
        return vals * scale.to(torch.float32)
