"""Peak resident memory of apply's rounding of one wide layer, from random factors of its size: what
`bitplan.resources.APPLY_WEIGHT_BUFFERS` is set from.

    python benchmarks/apply_memory.py --shape 8192x2048 --rounding yaqa --format higgs-p2-n64-g128

It writes both calibration halves' factor files as a profile does (float32, Σxxᵀ included) into a temporary
folder, then runs what apply runs for one layer (`bitplan.apply.run.rounding_factors`, `quantize_layer` with the
factors consumed), sampling the resident memory every millisecond, and prints the peak above the start in GiB,
in m×n float64 buffers beyond the factor sides' n×n ones, and the resource plan's forecast of the same.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitplan.apply.layer import quantize_layer  # noqa: E402
from bitplan.apply.run import rounding_factors  # noqa: E402
from bitplan.formats import get_format  # noqa: E402
from bitplan.memory import map_large_blocks, release_freed_memory  # noqa: E402
from bitplan.profile.directory import ProfileDir  # noqa: E402
from bitplan.profile.factors import FactorSums  # noqa: E402
from bitplan.profile.hessians import factors_path, save_half_factors  # noqa: E402
from bitplan.resources import APPLY_WEIGHT_BUFFERS  # noqa: E402
from benchmarks.timing import PeakResident  # noqa: E402

NAME = "model.layers.0.mlp.down_proj"


def random_factor(k: int, seed: int) -> torch.Tensor:
    X = torch.randn(k, 2 * k, generator=torch.Generator().manual_seed(seed))
    return X @ X.T


def write_factors(folder: Path, m: int, n: int) -> None:
    for half, seed in (("a", 1), ("b", 4)):
        sums = FactorSums(random_factor(m, seed), random_factor(n, seed + 1), random_factor(n, seed + 2), 1.0, 8, 2048)
        path = factors_path(folder, NAME, half)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_half_factors(path, NAME, half, sums, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8192x2048")
    ap.add_argument("--rounding", choices=["yaqa", "ldlq"], default="yaqa")
    ap.add_argument("--format", default="higgs-p2-n64-g128")
    ap.add_argument("--shrink", type=float, default=0.1)
    args = ap.parse_args()
    m, n = map(int, args.shape.split("x"))
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        write_factors(Path(tmp), m, n)
        map_large_blocks()
        release_freed_memory()
        with PeakResident() as p:
            H_in, H_out, _ = rounding_factors(ProfileDir(Path(tmp)), NAME, args.rounding, (m, n))
            quantize_layer(NAME, W, get_format(args.format), args.rounding, H_in, H_out, shrink_out=args.shrink,
                           shrink_in=args.shrink, consume_factors=True)
    seconds, extra = p.seconds, p.extra
    sides = 8 * (n * n + (m * m if args.rounding == "yaqa" else 0))
    forecast = max(APPLY_WEIGHT_BUFFERS * 8 * m * n + sides, sides + 8 * max(m * m, n * n) + 4 * m * n)
    print(f"{m}x{n} {args.rounding} {args.format}: {seconds:.0f} s; peak {extra / 2 ** 30:.2f} GiB above the start "
          f"({(extra - sides) / (8 * m * n):.1f} float64 m×n buffers beside the factor sides' n×n ones); "
          f"forecast {forecast / 2 ** 30:.2f} GiB")


if __name__ == "__main__":
    main()
