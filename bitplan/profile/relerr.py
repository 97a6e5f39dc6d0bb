"""Each layer's measured relative error t² = ‖W̃ − Q(W̃)‖²/‖W̃‖² in every candidate format, round-to-nearest.

W̃ is the weight rotated on both sides by randomized Hadamard transforms whose seeds are derived from the layer
name (`rotation_seeds`), so a later `apply` rotates the same layer the same way. Formats with
`rotated = False` (fp16, ggml's block types) are measured on W itself; a format the layer's shape rules out
(`Format.applicable`: a K-type on rows that are not whole 256-weight blocks) has no entry. Grid formats are measured with `for_measuring()`, which
lets the k-d tree settle exact ties between equidistant codes (measure zero in real weights), 1.3–1.8× faster,
and the grids of one group size and vector dimension share one `GridFormat.normalize` (the same scales and
normalized vectors, computed once rather than once per grid; `benchmarks/relerr_bench.py`).
"""
from __future__ import annotations

import hashlib

import torch

from ..formats import Format, rotate_weight
from ..formats.higgs import GridFormat, NormalizedWeight


def rotation_seeds(name: str, seed: int = 0) -> tuple[int, int]:
    """(seed_out, seed_in) for layer `name`: stable across runs, machines and bitplan versions."""
    def one(side: str) -> int:
        digest = hashlib.sha256(f"bitplan.rotation:{seed}:{name}:{side}".encode()).digest()
        return int.from_bytes(digest[:8], "little")
    return one("out"), one("in")


def relative_errors(W: torch.Tensor, name: str, formats: list[Format],
                    importance: torch.Tensor | None = None) -> dict[str, float]:
    """t² per applicable format; `importance` [n] (the layer's mean x² per input column) weights the scale
    search of formats that use one (ggml's)."""
    # On the host in float32: the grid formats' nearest-code search (a k-d tree) and ggml's block packing are host
    # code, so a device copy would come back for them anyway; one layer's weight crosses at a time.
    W = W.detach().to("cpu", torch.float32)
    formats = [f for f in formats if f.applicable(*W.shape)]
    rotated = rotate_weight(W, *rotation_seeds(name)) if any(f.rotated for f in formats) else None
    out: dict[str, float] = {}
    normalized: dict[tuple[int, int], NormalizedWeight] = {}   # grid formats are all rotated
    # the weight each format's error is of (rotated or not), in float64, and its squared norm: once per layer
    exact = {side: (rotated if side else W).double() for side in {f.rotated for f in formats}}
    sq_norm = {side: float(v.pow(2).sum()) for side, v in exact.items()}
    for fmt in formats:
        src = rotated if fmt.rotated else W
        measuring = fmt.for_measuring()
        if isinstance(measuring, GridFormat):
            key = (measuring.group_size, measuring.vector_dim)
            if key not in normalized:
                normalized[key] = measuring.normalize(src)
            q = measuring.round_normalized(normalized[key])
        elif importance is not None and fmt.kind == "ggml":
            q = measuring.dequantize(measuring.quantize(src, importance))
        else:
            q = measuring.dequantize(measuring.quantize(src))
        err = exact[fmt.rotated] - q.double()
        out[fmt.name] = float((err * err).sum()) / sq_norm[fmt.rotated]
    return out
