"""The `Format` interface shared by every quantization format, and its records.

Conventions (W ∈ R^{m×n}, out × in):
- groups run along the input dimension: group j of a row covers columns [j·g, min((j+1)·g, n)); a row whose
  length is not a multiple of g ends in a short tail group with its own scale;
- vectors (grid formats, p > 1) are p consecutive entries of a row; a row is padded with zeros to a multiple
  of p and the padding codes are stored;
- scales and zeros are fixed by `fit` from the (rotated) weights and are already fp16-representable, so
  dequantizing from the stored fp16 values reproduces `round` exactly;
- `round`, `encode`, `decode` work on any tile: pass the per-weight scale/zero slices from `per_weight`.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BitplanError
from .packing import pack_bits, unpack_bits

SEED_BITS = 2 * 64  # two rotation seeds (output side, input side) per rotated layer
FP16_MAX = 65504.0


@dataclass
class GroupParams:
    """Per-group parameters of one layer: scale [m, G] (and zero [m, G]); float32 holding fp16 values."""

    scale: torch.Tensor
    zero: torch.Tensor | None = None


@dataclass
class QuantizedWeight:
    """A quantized layer: codes [m, ceil(n/p)] (int32) and its group parameters."""

    format: str
    shape: tuple[int, int]
    codes: torch.Tensor
    params: GroupParams


def check_finite(W: torch.Tensor, what: str = "weight") -> None:
    """BitplanError naming how many NaN / Inf entries `W` has."""
    if W.is_floating_point() and not bool(torch.isfinite(W).all()):
        nan = int(torch.isnan(W).sum())
        inf = int(torch.isinf(W).sum())
        raise BitplanError(f"{what} of shape {tuple(W.shape)} has {nan} NaN and {inf} Inf values; "
                           "quantization needs finite weights")


def check_matrix(W: torch.Tensor, what: str = "weight") -> torch.Tensor:
    if not isinstance(W, torch.Tensor):
        raise BitplanError(f"{what} must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2 or W.shape[0] < 1 or W.shape[1] < 1:
        raise BitplanError(f"{what} must be a non-empty 2-D [out, in] tensor, got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise BitplanError(f"{what} must be a floating-point tensor, got {W.dtype}")
    check_finite(W, what)
    return W


def to_fp16_values(x: torch.Tensor, what: str, mode: str = "nearest") -> torch.Tensor:
    """Round to fp16-representable values (float32 result): nearest, down (≤ x) or up (≥ x).

    Raises BitplanError where fp16 cannot hold the value."""
    a = x.detach().to("cpu", torch.float64).numpy()
    if np.abs(a).max(initial=0.0) > FP16_MAX:
        raise BitplanError(f"a {what} of {np.abs(a).max():.4g} exceeds the fp16 range (±{FP16_MAX:g}); "
                           "scale the weights down first")
    h = a.astype(np.float16)
    if mode == "down":
        h = np.where(h.astype(np.float64) > a, np.nextafter(h, np.float16(-np.inf)), h)
    elif mode == "up":
        h = np.where(h.astype(np.float64) < a, np.nextafter(h, np.float16(np.inf)), h)
    if not np.isfinite(h).all():
        raise BitplanError(f"a {what} leaves the fp16 range (±{FP16_MAX:g}); scale the weights down first")
    return torch.from_numpy(h.astype(np.float32)).to(x.device)


def group_bounds(n: int, g: int) -> list[tuple[int, int]]:
    return [(s, min(s + g, n)) for s in range(0, n, g)]


def group_lengths(n: int, g: int) -> torch.Tensor:
    G = math.ceil(n / g)
    lens = torch.full((G,), g, dtype=torch.int64)
    lens[-1] = n - (G - 1) * g
    return lens


def expand_groups(x: torch.Tensor, n: int, g: int) -> torch.Tensor:
    """[m, G] per-group values → [m, n] per-weight values (the tail group may be shorter)."""
    return torch.repeat_interleave(x, group_lengths(n, g).to(x.device), dim=1)


def pad_cols(x: torch.Tensor, width: int, mode: str) -> torch.Tensor:
    """Pad the last dim to `width`: with zeros, or by repeating the last column (for scales)."""
    extra = width - x.shape[-1]
    if extra <= 0:
        return x
    if mode == "zero":
        pad = torch.zeros(*x.shape[:-1], extra, dtype=x.dtype, device=x.device)
    else:
        pad = x[..., -1:].expand(*x.shape[:-1], extra)
    return torch.cat([x, pad], dim=-1)


@dataclass(frozen=True)
class Format(ABC):
    """A quantization format. Subclasses: GridFormat (`higgs-p{p}-n{n}-g{g}`), IntFormat (`int{b}-g{g}`),
    FP16Format (`fp16`), GgmlFormat (ggml's block types, `q4_K` etc.)."""

    name: str
    kind: str  # "grid", "int", "ggml" or "fp16"
    nominal_bits: float  # code bits per weight: log2(n)/p, b or 16
    group_size: int  # g; 0 for fp16
    vector_dim: int  # p; 1 for int and fp16
    code_bits: int  # bits of one code
    mse_q: float  # relative MSE on i.i.d. N(0, 1) matrices (measured, package data)
    rotated: bool  # the caller rotates W on both sides (randomized Hadamard) before quantizing
    codebook_bits: int  # size of the grid table, stored once per checkpoint; 0 without one

    # -- storage ---------------------------------------------------------------------------------------
    @property
    def has_zero(self) -> bool:
        return False

    def applicable(self, m: int, n: int) -> bool:
        """Whether an m×n layer can take this format (ggml's block types need whole blocks per row)."""
        return True

    def code_words(self, n: int) -> int:
        """int32 words of packed codes per row of length n."""
        return math.ceil(math.ceil(n / self.vector_dim) * self.code_bits / 32)

    def num_groups(self, n: int) -> int:
        return math.ceil(n / self.group_size) if self.group_size else 0

    def storage_bits(self, m: int, n: int) -> int:
        """Exact bits written for an m×n layer: the tensors of `pack` (codes in int32 words per row, fp16
        scales and zeros) plus 2 × 64 bits of rotation seeds when `rotated`."""
        if m < 1 or n < 1:
            raise BitplanError(f"layer shape must be positive, got {m}×{n}")
        bits = m * self.code_words(n) * 32
        bits += m * self.num_groups(n) * 16 * (2 if self.has_zero else 1)
        return bits + (SEED_BITS if self.rotated else 0)

    def bits_per_weight(self, m: int, n: int) -> float:
        return self.storage_bits(m, n) / (m * n)

    def codebook(self) -> torch.Tensor | None:
        """The grid table [n, p] (float32) for grid formats, else None."""
        return None

    def for_measuring(self) -> "Format":
        """This format as the profile measures its round-to-nearest error: the same values, except that a
        grid format may settle an exact tie between equidistant codes otherwise (the same distance
        in the normalized space; such ties have measure zero in real weights)."""
        return self

    # -- per-format parts --------------------------------------------------------------------------------
    @abstractmethod
    def fit(self, W: torch.Tensor, importance: torch.Tensor | None = None) -> GroupParams:
        """Group parameters fixed from the (rotated) weights W [m, n], fp16-representable. `importance` [n]
        (non-negative, per input column: the layer's mean x²) weights the fit where a format uses it."""

    @abstractmethod
    def encode(self, T: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None = None) -> torch.Tensor:
        """Codes (int32) of T [..., L] (L a multiple of vector_dim) with per-weight scale/zero of T's shape;
        last dim of the result is L / vector_dim."""

    @abstractmethod
    def decode(self, codes: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None = None) -> torch.Tensor:
        """Values (float32) of codes [..., L/p] with per-weight scale/zero of shape [..., L]."""

    # -- generic -----------------------------------------------------------------------------------------
    def per_weight(self, params: GroupParams, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale (and zero) of each weight, [m, n], so a caller can slice any tile."""
        scale = expand_groups(params.scale, n, self.group_size)
        zero = expand_groups(params.zero, n, self.group_size) if params.zero is not None else None
        return scale, zero

    def round(self, T: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None = None) -> torch.Tensor:
        """Q(T): the nearest representable values, T's shape; float64 if T is float64, else float32."""
        out = self.decode(self.encode(T, scale, zero), scale, zero)
        return out.to(torch.float64) if T.dtype == torch.float64 else out

    def quantize(self, W: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedWeight:
        check_matrix(W)
        m, n = W.shape
        params = self.fit(W, importance)
        scale, zero = self.per_weight(params, n)
        width = math.ceil(n / self.vector_dim) * self.vector_dim
        T = pad_cols(W, width, "zero")
        scale = pad_cols(scale, width, "edge")
        zero = pad_cols(zero, width, "edge") if zero is not None else None
        return QuantizedWeight(self.name, (m, n), self.encode(T, scale, zero), params)

    def _check_qw(self, qw: QuantizedWeight) -> None:
        if qw.format != self.name:
            raise BitplanError(f"quantized weight is in format {qw.format}, not {self.name}")

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        self._check_qw(qw)
        m, n = qw.shape
        scale, zero = self.per_weight(qw.params, n)
        width = math.ceil(n / self.vector_dim) * self.vector_dim
        scale = pad_cols(scale, width, "edge")
        zero = pad_cols(zero, width, "edge") if zero is not None else None
        return self.decode(qw.codes, scale, zero)[:, :n]

    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """safetensors-ready tensors: `codes` (int32 words, little-endian bitstream per row), `scale` (fp16)
        and, for formats with a zero point, `zero` (fp16)."""
        self._check_qw(qw)
        out = {"codes": pack_bits(qw.codes, self.code_bits), "scale": qw.params.scale.to(torch.float16).contiguous()}
        if self.has_zero:
            out["zero"] = qw.params.zero.to(torch.float16).contiguous()
        return out

    def unpack(self, tensors: dict[str, torch.Tensor], m: int, n: int) -> QuantizedWeight:
        expected = {"codes", "scale"} | ({"zero"} if self.has_zero else set())
        if set(tensors) != expected:
            raise BitplanError(f"{self.name}: packed layer needs tensors {sorted(expected)}, got {sorted(tensors)}")
        G, K = self.num_groups(n), math.ceil(n / self.vector_dim)
        codes = tensors["codes"]
        if tuple(codes.shape) != (m, self.code_words(n)) or codes.dtype != torch.int32:
            raise BitplanError(f"{self.name}: packed codes should be int32 [{m}, {self.code_words(n)}] for a {m}×{n} "
                               f"layer, got {codes.dtype} {tuple(codes.shape)}")
        for key in expected - {"codes"}:
            t = tensors[key]
            if tuple(t.shape) != (m, G) or t.dtype != torch.float16:
                raise BitplanError(f"{self.name}: packed {key} should be float16 [{m}, {G}], got {t.dtype} {tuple(t.shape)}")
        zero = tensors["zero"].to(torch.float32) if self.has_zero else None
        params = GroupParams(tensors["scale"].to(torch.float32), zero)
        return QuantizedWeight(self.name, (m, n), unpack_bits(codes, self.code_bits, K), params)

    def __str__(self) -> str:
        return self.name
