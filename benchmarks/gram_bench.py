"""The factors' weighted Gram matrices aᵀ diag(w) a (factors.py: `weighted_gram`) against one full matmul, at the
default model's layer widths and the profile's batch of 4 × 256 tokens.

    python benchmarks/gram_bench.py --blocks 96,128,192,384

For each width n and rows per block, both ways run alternately on the same inputs (so they see the same machine
load); it prints the median milliseconds of each, their ratio, and the largest difference from the full matmul
relative to its largest entry.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import alternated_ms  # noqa: E402
from bitplan.profile.factors import GRAM_BLOCK, weighted_gram  # noqa: E402



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="192,576,1536", help="layer widths n (the default model's)")
    ap.add_argument("--tokens", type=int, default=1024, help="rows N of a (tokens per batch)")
    ap.add_argument("--blocks", default=f"96,{GRAM_BLOCK},192,384", help="rows per block to try")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    table = Table(title=f"aᵀ diag(w) a, a [{args.tokens}, n] float32, {torch.get_num_threads()} threads "
                        "(median ms over alternated runs)")
    for col in ("n", "rows per block", "full matmul ms", "weighted_gram ms", "ratio", "max |diff| / max"):
        table.add_column(col, justify="right")
    for n in (int(v) for v in args.widths.split(",")):
        a = torch.randn(args.tokens, n, generator=gen)
        w = torch.rand(args.tokens, 1, generator=gen)
        full = (a * w).T @ a
        for block in (int(v) for v in args.blocks.split(",")):
            if block >= n:
                continue
            diff = float((weighted_gram(a, w, block) - full).abs().max() / full.abs().max())
            ms = alternated_ms({"full": lambda: (a * w).T @ a, "ours": lambda: weighted_gram(a, w, block)},
                               args.reps)
            p, o = ms["full"], ms["ours"]
            table.add_row(str(n), str(block), f"{p:.2f}", f"{o:.2f}", f"{o / p:.3f}", f"{diff:.1e}")
    Console().print(table)


if __name__ == "__main__":
    main()
