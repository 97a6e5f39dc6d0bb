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


# Working set of one block of rows, per weight of the block: the peak resident memory beyond the rotated copy
# while the 39 default formats measure a 2048×1024 random matrix, 147–165 bytes (`benchmarks/relerr_memory.py`;
# the grids' shared normalizations, float64, dominate it; ggml's 13 block types take 66)
WORK_BYTES_PER_WEIGHT = 165
# Bytes of working set a block may take: the block's row count follows from it, so a wide matrix (the 128256-row
# embedding of a 1B model) is measured in bounded memory and a small one in one block.
BLOCK_BYTES = 256 * 2 ** 20


def block_rows(m: int, n: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Rows per block of an m×n matrix so that one block's working set stays near `block_bytes`."""
    return max(1, min(m, block_bytes // (WORK_BYTES_PER_WEIGHT * max(1, n))))


def relative_errors(W: torch.Tensor, name: str, formats: list[Format],
                    importance: torch.Tensor | None = None, block_bytes: int = BLOCK_BYTES) -> dict[str, float]:
    """t² per applicable format; `importance` [n] (the layer's mean x² per input column) weights the scale
    search of formats that use one (ggml's).

    Every format's groups, vectors and blocks lie along a row, so ‖W̃ − Q(W̃)‖² is a sum over rows: the matrix is
    rotated once (float32), then measured in blocks of rows whose working set is about `block_bytes`, each
    format's squared error summed in float64 across blocks."""
    # On the host in float32: the grid formats' nearest-code search (a k-d tree) and ggml's block packing are host
    # code, so a device copy would come back for them anyway; one layer's weight crosses at a time.
    W = W.detach().to("cpu", torch.float32)
    m, n = W.shape
    formats = [f for f in formats if f.applicable(m, n)]
    rotated = rotate_weight(W, *rotation_seeds(name)) if any(f.rotated for f in formats) else None
    sides = {f.rotated for f in formats}
    sq_norm = dict.fromkeys(sides, 0.0)
    sq_err = {f.name: 0.0 for f in formats}
    step = block_rows(m, n, block_bytes)
    for r0 in range(0, m, step):
        rows = slice(r0, min(m, r0 + step))
        # the block each format's error is of (rotated or not), in float64, and its squared norm
        exact = {side: (rotated if side else W)[rows].double() for side in sides}
        for side, v in exact.items():
            sq_norm[side] += float(v.pow(2).sum())
        normalized: dict[tuple[int, int], NormalizedWeight] = {}   # grid formats are all rotated
        for fmt in formats:
            src = (rotated if fmt.rotated else W)[rows]
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
            del q
            sq_err[fmt.name] += float((err * err).sum())
            del err
        del exact, normalized
    return {f.name: sq_err[f.name] / sq_norm[f.rotated] for f in formats}
