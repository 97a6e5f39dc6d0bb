"""Peak resident memory of apply's rounding of one wide layer, from random factors of its size: what
`bitplan.resources.APPLY_FACTOR_BUFFERS` and `APPLY_WEIGHT_BUFFERS` are set from.

    python benchmarks/apply_memory.py --shape 2048x8192 --rounding yaqa --format int4-g128

It builds both calibration halves' factors as a profile's files give them to apply (float64, Σxxᵀ included),
then runs what apply runs for one layer (`bitplan.apply.run.rounding_factors`, `quantize_layer`), sampling the
resident memory every millisecond, and prints the peak above the start in GiB and in n×n float64 buffers.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitplan.apply.layer import quantize_layer  # noqa: E402
from bitplan.apply.run import release_freed_memory  # noqa: E402
from bitplan.formats import get_format  # noqa: E402
from bitplan.profile.hessians import LayerFactors  # noqa: E402


def random_factor(k: int, seed: int) -> torch.Tensor:
    X = torch.randn(k, 2 * k, generator=torch.Generator().manual_seed(seed))
    return (X @ X.T).double()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="2048x8192")
    ap.add_argument("--rounding", choices=["yaqa", "ldlq"], default="yaqa")
    ap.add_argument("--format", default="int4-g128")
    ap.add_argument("--shrink", type=float, default=0.1)
    args = ap.parse_args()
    m, n = map(int, args.shape.split("x"))
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(0))
    f = LayerFactors("model.layers.0.mlp.down_proj", random_factor(m, 1), random_factor(n, 2), random_factor(m, 3),
                     random_factor(n, 4), random_factor(n, 5), random_factor(n, 6), 1.0, 1.0, 8, 8, 2048, 2048, 0)
    release_freed_memory()
    proc, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    before = proc.memory_info().rss
    t = threading.Thread(target=sample)
    t.start()
    t0 = time.perf_counter()
    try:
        from bitplan.apply.run import rounding_factors
        H_in, H_out = rounding_factors(f, args.rounding)
    except ImportError:   # bitplan before rounding_factors: the sums as apply formed them then
        H_in, H_out = (f.xtx, None) if args.rounding == "ldlq" else (f.h_in, f.h_out)
    del f
    quantize_layer("model.layers.0.mlp.down_proj", W, get_format(args.format), args.rounding, H_in, H_out,
                   shrink_out=args.shrink, shrink_in=args.shrink)
    seconds = time.perf_counter() - t0
    done.set()
    t.join()
    # the halves as read are in `before`: the figure is what rounding adds to a process that has read them
    halves = (2 * m * m + 4 * n * n) * 8
    extra = peak[0] - before
    print(f"{m}x{n} {args.rounding} {args.format}: {seconds:.0f} s; peak {(before + extra) / 2 ** 30:.2f} GiB "
          f"resident ({extra / 2 ** 30:.2f} GiB above the halves as read, {halves / 2 ** 30:.2f} GiB); "
          f"{(extra + halves) / (8 * (m * m + n * n)):.1f} float64 (m² + n²) buffers including the halves")


if __name__ == "__main__":
    main()
