"""Peak resident memory of the format phase on one random matrix, measured in blocks of rows: what
`bitplan.profile.relerr.WORK_BYTES_PER_WEIGHT` is set from.

    python benchmarks/relerr_memory.py --shape 2048x2048 --rows 512 --formats default
    python benchmarks/relerr_memory.py --shape 2048x2048 --rows 512 --formats ggml

It samples the process's resident memory every millisecond while `relative_errors` runs and prints the peak above
the resident memory before the call less the rotated copy it makes (4 bytes per weight), per weight of one block.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitplan.formats.registry import ggml_candidates  # noqa: E402
from bitplan.profile import relerr  # noqa: E402
from bitplan.profile.inputs import candidate_formats  # noqa: E402
from benchmarks.timing import PeakResident  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="2048x2048")
    ap.add_argument("--rows", type=int, default=512, help="rows per block")
    ap.add_argument("--formats", choices=["default", "ggml"], default="default")
    args = ap.parse_args()
    m, n = map(int, args.shape.split("x"))
    fmts = candidate_formats(None) if args.formats == "default" else ggml_candidates()
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(0))
    relerr.relative_errors(W[:8], "warm-up", fmts)          # libraries' one-time buffers outside the figure
    with PeakResident() as p:
        relerr.relative_errors(W, "bench", fmts, block_bytes=args.rows * n * relerr.WORK_BYTES_PER_WEIGHT)
    seconds = p.seconds
    work = p.extra - 4 * m * n
    print(f"{m}x{n}, {len(fmts)} {args.formats} formats, {args.rows} rows per block: {seconds:.1f} s, peak "
          f"{p.extra / 2 ** 20:.0f} MiB above the start, {work / (args.rows * n):.0f} bytes per weight "
          "of a block beyond the rotated copy")


if __name__ == "__main__":
    main()
