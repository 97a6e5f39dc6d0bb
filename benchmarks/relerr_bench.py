"""The profile's format phase on the default model: t² of every candidate format on a few blocks' layers, measured
as the profile does (`for_measuring`: the k-d tree settles exact ties; the grids of one group size and vector
dimension share one normalization of the weight) against each grid format quantized and dequantized on its own,
with exact lowest-index ties and with `for_measuring`.

    python benchmarks/relerr_bench.py --blocks 5,20

The ways run on the same layers, alternated layer by layer so they see the same machine load. It prints each
way's seconds, their ratio, the projection to all blocks, and the largest relative difference in t² from the
first way.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitplan.models import find_linears, get_module, load_model  # noqa: E402
from bitplan.profile import relerr  # noqa: E402
from bitplan.profile.inputs import candidate_formats  # noqa: E402


class _OneAtATime:
    """A format measured through its own quantize/dequantize (no normalization shared with other grids), with
    exact ties or, `measuring`, as `for_measuring` settles them."""

    def __init__(self, fmt, measuring: bool):
        self.name, self.rotated = fmt.name, fmt.rotated
        self._fmt = fmt.for_measuring() if measuring else fmt

    def for_measuring(self):
        return self

    def quantize(self, W):
        return self._fmt.quantize(W)

    def dequantize(self, qw):
        return self._fmt.dequantize(qw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="5,20")
    args = ap.parse_args()
    lm = load_model(args.model)
    infos = find_linears(lm.model)
    blocks = {int(b) for b in args.blocks.split(",")}
    fmts = candidate_formats(None)
    ways = {"exact ties, one format at a time": [_OneAtATime(f, False) for f in fmts],
            "for_measuring, one format at a time": [_OneAtATime(f, True) for f in fmts],
            "for_measuring, shared normalization (profile)": fmts}
    first = next(iter(ways))
    seconds = {w: 0.0 for w in ways}
    t2 = {w: {} for w in ways}
    layers = [i for i in infos if i.block in blocks]
    for info in layers:
        W = get_module(lm.model, info.name).weight
        for w, fs in ways.items():
            t0 = time.perf_counter()
            t2[w][info.name] = relerr.relative_errors(W, info.name, fs)
            seconds[w] += time.perf_counter() - t0
    diff = {w: max(abs(t2[w][k][f] / t2[first][k][f] - 1) for k in t2[first] for f in t2[first][k]
                   if t2[first][k][f] > 0) for w in ways}
    n_blocks = max(i.block for i in infos) + 1
    table = Table(title=f"format errors: {len(fmts)} formats × {len(layers)} layers (blocks {args.blocks})")
    for col in ("way", "seconds", "÷ the first", f"projected, {n_blocks} blocks", "max t² difference"):
        table.add_column(col, justify="left" if col == "way" else "right")
    for w, s in seconds.items():
        table.add_row(w, f"{s:.1f}", f"{s / seconds[first]:.3f}", f"{s * n_blocks / len(blocks):.0f} s",
                      f"{diff[w]:.1e}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
