"""Chunked Kronecker-factor sketch: H_O = Σ_c G_c G_cᵀ and H_I = Σ_c G_cᵀ G_c with G_c = g_cᵀ x_c, and the
inputs' second moment Σ_t x_t x_tᵀ (one-sided LDLQ's H_I, kept with the factors so GPTQ-style rounding needs no
second pass over the calibration).

Each chunk c of T' consecutive tokens of one sequence is one sample (DESIGN.md, "What a CPU prototype
measured"): T' = seqlen is YAQA's sketch B, T' = 1 is per token. G_c is never formed; with the chunk's Gram
matrices K_x = x_c x_cᵀ and K_g = g_c g_cᵀ (T'×T'):

    G_c G_cᵀ = g_cᵀ K_x g_c,    G_cᵀ G_c = x_cᵀ K_g x_c,    ‖G_c‖² = Σ K_x ∘ K_g,

so a batch costs about m² + n² + T'(m + n) multiply-adds per token. Products are taken in the activations'
dtype and summed into float64 accumulators.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ChunkStats:
    h_out: torch.Tensor    # m×m, Σ_c G_c G_cᵀ over the batch
    h_in: torch.Tensor     # n×n, Σ_c G_cᵀ G_c
    grad_sq: float         # Σ_c ‖G_c‖²_F (= tr h_out = tr h_in, kept separately as a check)
    samples: int           # number of chunks


def n_chunks(seqlen: int, chunk: int) -> int:
    return -(-seqlen // chunk)


def chunk_stats(x: torch.Tensor, g: torch.Tensor, chunk: int) -> ChunkStats:
    """Factor increments from one batch: x [B, T, n] layer inputs, g [B, T, m] gradients of the summed loss
    with respect to the layer outputs. A last chunk shorter than `chunk` is padded with zero tokens, which
    add nothing to its G_c."""
    B, T, n = x.shape
    m = g.shape[-1]
    if chunk == 1:
        # G_t = g_t x_tᵀ: G Gᵀ = ‖x_t‖² g_t g_tᵀ, Gᵀ G = ‖g_t‖² x_t x_tᵀ; one large matmul each.
        xf, gf = x.reshape(-1, n), g.reshape(-1, m)
        xsq, gsq = (xf * xf).sum(-1, keepdim=True), (gf * gf).sum(-1, keepdim=True)
        h_out = (gf * xsq).T @ gf
        h_in = (xf * gsq).T @ xf
        grad_sq = float((xsq * gsq).sum(dtype=torch.float64))
        return ChunkStats(h_out, h_in, grad_sq, B * T)
    c = n_chunks(T, chunk)
    pad = c * chunk - T
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        g = torch.nn.functional.pad(g, (0, 0, 0, pad))
    xc = x.reshape(B * c, chunk, n)
    gc = g.reshape(B * c, chunk, m)
    kx = xc @ xc.transpose(1, 2)
    kg = gc @ gc.transpose(1, 2)
    h_out = gc.reshape(-1, m).T @ (kx @ gc).reshape(-1, m)
    h_in = xc.reshape(-1, n).T @ (kg @ xc).reshape(-1, n)
    grad_sq = float((kx * kg).sum(dtype=torch.float64))
    return ChunkStats(h_out, h_in, grad_sq, B * c)


def input_moment(x: torch.Tensor) -> torch.Tensor:
    """Σ_t x_t x_tᵀ over every token of a batch x [B, T, n]."""
    xf = x.reshape(-1, x.shape[-1])
    return xf.T @ xf


@dataclass
class FactorSums:
    """Running float64 sums for one layer and one calibration half."""
    h_out: torch.Tensor
    h_in: torch.Tensor
    xtx: torch.Tensor | None = None   # Σ_t x_t x_tᵀ (None in profiles written before it was kept)
    grad_sq: float = 0.0
    samples: int = 0
    tokens: int = 0

    @classmethod
    def zeros(cls, out_features: int, in_features: int) -> "FactorSums":
        return cls(torch.zeros(out_features, out_features, dtype=torch.float64),
                   torch.zeros(in_features, in_features, dtype=torch.float64),
                   torch.zeros(in_features, in_features, dtype=torch.float64))

    def add(self, stats: ChunkStats, tokens: int, xtx: torch.Tensor | None = None) -> None:
        self.h_out += stats.h_out.to(torch.float64)
        self.h_in += stats.h_in.to(torch.float64)
        if xtx is not None:
            self.xtx += xtx.to(torch.float64)
        self.grad_sq += stats.grad_sq
        self.samples += stats.samples
        self.tokens += tokens


@dataclass
class HalfFactors:
    """All layers' running sums for one calibration half, plus where in its window list it stands."""
    half: str
    layers: dict[str, FactorSums] = field(default_factory=dict)
    next_batch: int = 0
