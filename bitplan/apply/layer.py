"""One layer, start to finish: rotate, fix the scales, round with the chosen feedback, pack.

ggml's block formats (`rotated = False`) skip the rotation: W and its factors stay in the original basis, the
scale search is weighted by diag(H_in) (the layer's mean x² per input column, what an imatrix holds) when H_in is
given, and the packed layer is ggml's blocks alone (no rotation seeds).

Rounding methods:
- `yaqa`: two-sided block LDLQ with the profile's Kronecker factors H_O ⊗ H_I;
- `ldlq`: one-sided block LDLQ (GPTQ-equivalent): H_O = I, H_I = E[xxᵀ] of the layer's inputs;
- `rtn`:  round-to-nearest.
Factors are rotated into the same randomized-Hadamard basis as the weights (the proxy is invariant), normalized
to mean diagonal 1, damped until Cholesky succeeds, and split by block LDL in float64.
With a `device`, the factor preparation and the error feedback (the work that grows as n³ and m·n·(m + n)) run
there; the rotation, the scale fit and the packing (about m·n·log n) stay on the CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import BitplanError
from ..formats import Format, QuantizedWeight, rotate_weight, unrotate_weight
from ..formats.hadamard import RandomizedHadamard, rotate_in_place
from ..heldout import DEFAULT_SHRINK_TARGET, rotated_target
from ..memory import release_freed_memory
from ..linalg import LDL, BlockLDL, block_ldl, error_sums, normalize, relative_error
from .ldlq import ldlq_round, proxy_from_ldl
from .module import encode_seeds
from ..profile.relerr import rotation_seeds

ROUNDINGS = ("yaqa", "ldlq", "rtn")
TILE = LDL.block  # rows per tile (columns: `tile_width`), the block the profile predicts the gains with


@dataclass
class LayerResult:
    name: str
    format: str
    tensors: dict[str, torch.Tensor]    # what the checkpoint stores for this layer (packed)
    W_hat: torch.Tensor | None          # dequantized weights in the original basis, float32 [m, n] (None: rounded
                                        # a block of rows at a time, not kept)
    stats: dict = field(default_factory=dict)


def tile_width(fmt: Format) -> int:
    """Columns per tile: a multiple of 16 that whole p-vectors fill (48 for p = 3)."""
    return TILE * fmt.vector_dim // math.gcd(TILE, fmt.vector_dim)


def prepared_factor(H: torch.Tensor, seed: int | None, lam: float, target: str = DEFAULT_SHRINK_TARGET,
                    device: torch.device | None = None, consume: bool = False) -> torch.Tensor:
    """H rotated (seed None: not), normalized and shrunk toward `target` by λ, float64 in a buffer of its own (on
    `device` after the rotation). `consume`: H (float64 on the CPU) may be overwritten, so the steps run in its
    own buffer (a factor is n × n float64: 0.5 GiB at n = 8192)."""
    T = rotated_target(H, seed, target) if lam else None       # reads H's diagonal: before H is rotated
    H = H if consume and H.dtype == torch.float64 and H.device.type == "cpu" else H.to("cpu", torch.float64, copy=True)
    if seed is not None:
        had = RandomizedHadamard(H.shape[0], seed)
        rotate_in_place(H, had, had)     # rotate_factor's two passes
    if device is not None:
        H, T = H.to(device), (T.to(device) if T is not None else None)
    # normalized_pair and shrink, in place: the same operations, so the same values
    mean_diag = H.diagonal().mean()
    if not torch.isfinite(mean_diag) or mean_diag <= 0:
        normalize(H)   # raises its clear error
    if T is not None:
        T.div_(mean_diag)
    H.div_(mean_diag)
    if lam:
        if T is None:
            T = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        H.mul_(1.0 - lam).add_(T.mul_(lam))
    return H


def prepare_factor(H: torch.Tensor, seed: int | None, block: int, lam: float, name: str,
                   target: str = DEFAULT_SHRINK_TARGET, device: torch.device | None = None,
                   consume: bool = False) -> BlockLDL:
    """The block LDL of `prepared_factor`, split in that factor's own buffer: at most two n × n float64 buffers
    at once. The factor itself is not kept: L, D and σ give it back where needed (`proxy_from_ldl`); with
    `consume`, H is left empty (its storage released, whoever else holds it)."""
    prepared = prepared_factor(H, seed, lam, target, device, consume)
    ldl = block_ldl(prepared, block, sigma=LDL.sigma, name=name, overwrite=True)
    if consume:   # spent: release its storage now, though the caller still holds the tensor (it is left empty)
        H.set_()
    return ldl


@dataclass
class _Prepared:
    """What every block of a layer's rows is rounded with: the factors' LDLs, the rotation seeds, the ggml
    formats' column importance."""
    seed_out: int | None
    seed_in: int | None
    importance: torch.Tensor | None
    ldl_in: BlockLDL | None = None
    ldl_out: BlockLDL | None = None


def _prepare(name: str, m: int, n: int, fmt: Format, rounding: str, H_in: torch.Tensor | None,
             H_out: torch.Tensor | None, shrink_out: float, shrink_in: float, target: str, seed: int,
             device: torch.device, consume_factors: bool) -> tuple[_Prepared, dict]:
    """The factors' LDLs and what else every block of rows shares (`rounding` already checked by the caller)."""
    if not fmt.applicable(m, n):
        raise BitplanError(f"{name}: {fmt.name} cannot store a {m}×{n} layer (rows must be whole "
                           f"{getattr(fmt, 'block_size', 1)}-weight blocks); choose another format for it")
    seed_out, seed_in = rotation_seeds(name, seed) if fmt.rotated else (None, None)
    # ggml formats (unrotated) weight their scales by the inputs' second moments where known
    importance = (H_in.detach().diagonal().to("cpu", torch.float64, copy=True)   # a copy: H_in may be consumed
                  if H_in is not None and not fmt.rotated else None)
    prep, stats = _Prepared(seed_out, seed_in, importance), {}
    if rounding != "rtn":
        # The factors first, while no weight-sized buffer is held: their LDL is the largest step (two n × n).
        if H_in is None or (rounding == "yaqa" and H_out is None):
            raise BitplanError(f"{name}: {rounding} rounding needs the profile's Hessian factors for this layer")
        bi = tile_width(fmt)
        if n % bi or m % TILE:
            raise BitplanError(f"{name}: a {m}×{n} layer does not split into {TILE}×{bi} tiles for {fmt.name}; "
                               f"use --rounding rtn or a format with vector length 1, 2 or 4")
        prep.ldl_in = prepare_factor(H_in, seed_in, bi, shrink_in if rounding == "yaqa" else 0.0,
                                     f"{name} (H_in)", target, device, consume_factors)
        prep.ldl_out = (prepare_factor(H_out, seed_out, TILE, shrink_out, f"{name} (H_out)", target, device,
                                       consume_factors) if rounding == "yaqa" else None)
        stats.update(sigma_in=prep.ldl_in.sigma, sigma_out=prep.ldl_out.sigma if prep.ldl_out else 0.0)
    return prep, stats


def _round_rows(W: torch.Tensor, fmt: Format, rounding: str, prep: _Prepared, device: torch.device,
                stats: dict, rotated: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Round W (the whole weight, or a block of its rows where rows round independently) and pack it; returns
    the packed tensors and Ŵ in the original basis (float64), and adds the proxies to `stats`. `rotated`: W is
    a block of rows of the weight already rotated (float64), and Ŵ is returned in that basis."""
    m, n = W.shape
    if fmt.rotated:
        W_rot = W if rotated else rotate_weight(W.to(torch.float64), prep.seed_out, prep.seed_in)
        params = fmt.fit(W_rot.to(torch.float32))
    else:
        W_rot = W.to(torch.float64)
        params = fmt.fit(W.to(torch.float32), prep.importance)
    scale, zero = fmt.per_weight(params, n)
    scale, zero = scale.double(), (zero.double() if zero is not None else None)
    if rounding == "rtn":
        if fmt.rotated:
            codes = fmt.quantize(W_rot.to(torch.float32)).codes  # fit is deterministic: the same params
        else:
            codes = fmt.encode(W_rot.to(torch.float32), scale, zero)
        del W_rot, scale, zero
    else:
        ldl_in, ldl_out = prep.ldl_in, prep.ldl_out
        W_dev = W_rot.to(device, copy=rotated)   # a rotated block is a view of the caller's buffer: not spent
        scale_dev = scale.to(device)
        zero_dev = zero.to(device) if zero is not None else None
        del W_rot, scale, zero
        rounded = ldlq_round(W_dev, fmt, scale_dev, zero_dev, ldl_in.L, ldl_out.L if ldl_out else None,
                             tile_width(fmt), TILE, keep_targets=False)
        codes = rounded.codes.cpu()
        E = W_dev - rounded.W_hat
        del rounded
        release_freed_memory()   # the rounding's many small temporaries, before the proxies' large ones
        E_rtn = W_dev.sub_(fmt.round(W_dev, scale_dev, zero_dev))   # W_dev is spent: its buffer holds E_rtn
        del W_dev, scale_dev, zero_dev
        stats["proxy"] = stats.get("proxy", 0.0) + proxy_from_ldl(E, ldl_in, ldl_out)
        del E
        stats["proxy_rtn"] = stats.get("proxy_rtn", 0.0) + proxy_from_ldl(E_rtn, ldl_in, ldl_out)
        del E_rtn
    qw = QuantizedWeight(fmt.name, (m, n), codes.to(torch.int32), params)
    tensors = fmt.pack(qw)
    # Dequantize from what is stored, so W_hat is exactly what a loaded checkpoint computes with.
    W_hat_rot = fmt.dequantize(fmt.unpack(tensors, m, n))
    if fmt.rotated and not rotated:
        tensors["rotation_seeds"] = encode_seeds(prep.seed_out, prep.seed_in)
        return tensors, unrotate_weight(W_hat_rot.to(torch.float64), prep.seed_out, prep.seed_in)
    return tensors, W_hat_rot.to(torch.float64)


def quantize_layer(name: str, W: torch.Tensor, fmt: Format, rounding: str = "yaqa",
                   H_in: torch.Tensor | None = None, H_out: torch.Tensor | None = None,
                   shrink_out: float = 0.0, shrink_in: float = 0.0, target: str = DEFAULT_SHRINK_TARGET,
                   seed: int = 0, device: torch.device | str | None = None,
                   consume_factors: bool = False) -> LayerResult:
    """Quantize one linear weight W [out, in] to `fmt`.

    H_in / H_out are the layer's factors in the original basis (float32/64); `yaqa` needs both, `ldlq` needs
    H_in = E[xxᵀ]; `rtn` needs neither. `shrink_out` / `shrink_in` move the normalized H_O / H_I (yaqa only)
    toward `target` (bitplan.heldout.SHRINK_TARGETS). `device` (default W's) runs the factors' preparation and
    the error feedback; the results come back to the CPU. `consume_factors`: H_in and H_out (float64) may be
    overwritten and are left empty, so their preparation needs no copies of them and their memory is released
    as soon as their LDL is made (apply passes sums it reads for this layer alone).
    """
    if rounding not in ROUNDINGS:
        raise BitplanError(f"unknown rounding {rounding!r}; choose one of {', '.join(ROUNDINGS)}")
    if not torch.isfinite(W).all():
        raise BitplanError(f"{name}: weight has NaN or Inf values")
    device = torch.device(device) if device is not None else W.device
    W = W.detach().to("cpu")     # kept in its own dtype for the relative error; the rounding works in float64
    m, n = W.shape
    if fmt.kind == "fp16":
        w16 = W.to(torch.float16)
        return LayerResult(name, fmt.name, {"weight": w16}, w16.to(torch.float32), {"rel_err": relative_error(W, w16)})
    prep, stats = _prepare(name, m, n, fmt, rounding, H_in, H_out, shrink_out, shrink_in, target, seed, device,
                           consume_factors)
    del H_in, H_out
    tensors, W_hat = _round_rows(W, fmt, rounding, prep, device, stats)
    del prep
    stats["rel_err"] = relative_error(W, W_hat)
    return LayerResult(name, fmt.name, tensors, W_hat.to(torch.float32), stats)


def rows_round_alone(fmt: Format, rounding: str) -> bool:
    """Whether each row of a weight, in the format's basis, rounds independently of the others, so that rounding
    a block of rows at a time gives the whole weight's codes: no output-side factor (rtn, ldlq), and groups, ggml
    blocks and vectors that lie along a row (every format here). A rotation along the output dimension mixes the
    rows of the original weight, so a rotated format's rows are those of the whole weight rotated first."""
    return fmt.kind != "fp16" and rounding in ("rtn", "ldlq")


def quantize_rows(name: str, blocks, shape: tuple[int, int], fmt: Format, rounding: str,
                  H_in: torch.Tensor | None = None, seed: int = 0, device: torch.device | str | None = None,
                  consume_factors: bool = False) -> LayerResult:
    """`quantize_layer` of a weight given as consecutive blocks of rows (`blocks` yields them; each a multiple of
    the 16-row tile), for a format and rounding whose rows round alone (`rows_round_alone`): the same packed
    tensors and statistics, with the rounding's float64 buffers for one block of rows at a time (a 128256 × 4096
    embedding is 2 GiB in float32, and its whole-matrix rounding held eight float64 copies). A rotated format
    first gathers the weight into one float64 buffer and rotates it in place (its rows mix), then rounds blocks
    of it as large as the first block given. Ŵ is not kept (W_hat None)."""
    if not rows_round_alone(fmt, rounding):
        raise BitplanError(f"{name}: {fmt.name} with {rounding} does not round a row at a time")
    device = torch.device(device) if device is not None else torch.device("cpu")
    m, n = shape
    prep, stats = _prepare(name, m, n, fmt, rounding, H_in, None, 0.0, 0.0, DEFAULT_SHRINK_TARGET, seed, device,
                           consume_factors)
    del H_in
    blocks = _checked_blocks(name, blocks, m, n)
    if fmt.rotated:   # the whole weight, rotated in one buffer; its blocks of rows are views of it
        W_rot = torch.empty(m, n, dtype=torch.float64)
        done, step = 0, None
        for W in blocks:
            step = step or W.shape[0]
            W_rot[done:done + W.shape[0]] = W
            done += W.shape[0]
            del W
        rotate_in_place(W_rot, RandomizedHadamard(m, prep.seed_out), RandomizedHadamard(n, prep.seed_in))
        blocks = (W_rot[r:r + step] for r in range(0, m, step))
    parts: dict[str, list[torch.Tensor]] = {}
    num = den = 0.0
    for W in blocks:
        tensors, W_hat = _round_rows(W, fmt, rounding, prep, device, stats, rotated=fmt.rotated)
        for key, t in tensors.items():
            parts.setdefault(key, []).append(t)
        a, b = error_sums(W, W_hat)   # a rotated block's error is the original's (the rotation is orthogonal)
        num, den = num + a, den + b
        del W, W_hat, tensors
        release_freed_memory()
    stats["rel_err"] = num / max(den, 1e-300)
    tensors = {k: torch.cat(v) for k, v in parts.items()}
    if fmt.rotated:
        tensors["rotation_seeds"] = encode_seeds(prep.seed_out, prep.seed_in)
    return LayerResult(name, fmt.name, tensors, None, stats)


def _checked_blocks(name: str, blocks, m: int, n: int):
    """`blocks` on the CPU, checked as they come: finite, n wide, whole tiles but the last, m rows in all."""
    done = 0
    for W in blocks:
        W = W.detach().to("cpu")
        if not torch.isfinite(W).all():
            raise BitplanError(f"{name}: weight has NaN or Inf values")
        if W.shape[1] != n or (done + W.shape[0] < m and W.shape[0] % TILE):
            raise BitplanError(f"{name}: a block of {tuple(W.shape)} does not continue a {m}×{n} weight in whole "
                               f"{TILE}-row tiles")
        done += W.shape[0]
        yield W
    if done != m:
        raise BitplanError(f"{name}: its blocks held {done} of {m} rows")
