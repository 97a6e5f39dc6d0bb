"""The profile's format phase on the default model: t² of every candidate format on a few blocks' layers, measured
as the profile does (`for_measuring`: the k-d tree settles exact ties) against exact lowest-index ties.

    python benchmarks/relerr_bench.py --blocks 5,20

Both ways run on the same layers, alternated layer by layer so they see the same machine load. It prints each
way's seconds, their ratio, the projection to all blocks, and the largest relative difference in t² between them.
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
from bitplan.profile.run import _formats  # noqa: E402


class _Exact:
    """A format measured with exact ties (what `for_measuring` relaxes)."""

    def __init__(self, fmt):
        self.fmt, self.name, self.rotated = fmt, fmt.name, fmt.rotated

    def for_measuring(self):
        return self.fmt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="5,20")
    args = ap.parse_args()
    lm = load_model(args.model)
    infos = find_linears(lm.model)
    blocks = {int(b) for b in args.blocks.split(",")}
    fmts = _formats(None)
    ways = {"exact ties": [_Exact(f) for f in fmts], "for_measuring (profile)": fmts}
    seconds = {w: 0.0 for w in ways}
    t2 = {w: {} for w in ways}
    layers = [i for i in infos if i.block in blocks]
    for info in layers:
        W = get_module(lm.model, info.name).weight
        for w, fs in ways.items():
            t0 = time.perf_counter()
            t2[w][info.name] = relerr.relative_errors(W, info.name, fs)
            seconds[w] += time.perf_counter() - t0
    diff = max(abs(t2["for_measuring (profile)"][k][f] / t2["exact ties"][k][f] - 1)
               for k in t2["exact ties"] for f in t2["exact ties"][k] if t2["exact ties"][k][f] > 0)
    n_blocks = max(i.block for i in infos) + 1
    table = Table(title=f"format errors: {len(fmts)} formats × {len(layers)} layers (blocks {args.blocks})")
    for col in ("way", "seconds", "÷ exact ties", f"projected, {n_blocks} blocks"):
        table.add_column(col, justify="left" if col == "way" else "right")
    for w, s in seconds.items():
        table.add_row(w, f"{s:.1f}", f"{s / seconds['exact ties']:.3f}", f"{s * n_blocks / len(blocks):.0f} s")
    console = Console(width=200)
    console.print(table)
    console.print(f"largest relative difference in t² between the two ways: {diff:.2e}")


if __name__ == "__main__":
    main()
