"""The randomized Hadamard rotation of a Hessian factor, R H Rᵀ (heldout.py: `rotate_factor`, used by the profile's
coefficients and judge and by `apply`), with the Sylvester part as tiled matmuls (hadamard.py: `fwht`) against
log2(N) butterfly passes (what `fwht` was before).

    python benchmarks/hadamard_bench.py --widths 192,576,1536,4096
    python benchmarks/hadamard_bench.py --profile p256 --blocks 5,20

Both ways run alternately on the same float64 n×n factor (so they see the same machine load); it prints the
median milliseconds of each, their ratio, and the largest difference between the two rotations relative to the
factor's largest entry. With --profile (a finished profile with its hessians/), it also times the profile's
coefficient phase (`layer_coefficients`) on the listed blocks' layers both ways, alternated layer by layer, and
the largest relative difference in the held-out gains and λs it gives.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import alternated_ms  # noqa: E402
from bitplan.formats import hadamard  # noqa: E402
from bitplan.heldout import rotate_factor  # noqa: E402


def butterfly_fwht(x: torch.Tensor) -> torch.Tensor:
    """The baseline: log2(N) butterfly passes along the last dim, each one a full pass over the tensor."""
    N, lead, h = x.shape[-1], x.shape[:-1], 1
    while h < N:
        y = x.reshape(*lead, N // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, N)
        h *= 2
    return x



@contextmanager
def using(fwht):
    """Rotations inside the block use `fwht` (RandomizedHadamard looks it up in its module at call time)."""
    tiled = hadamard.fwht
    hadamard.fwht = fwht
    try:
        yield
    finally:
        hadamard.fwht = tiled


def rotate_with(fwht, H: torch.Tensor, seed: int) -> torch.Tensor:
    with using(fwht):
        return rotate_factor(H, seed)


def coefficient_phase(profile: Path, blocks: set[int], console: Console) -> None:
    from bitplan.profile import load_factors, load_profile
    from bitplan.profile.coefficients import layer_coefficients

    prof = load_profile(profile)
    layers = [r for r in prof.layers if r.block in blocks]
    seconds = {"butterfly": 0.0, "tiled": 0.0}
    diff, lam_same = 0.0, True
    for rec in layers:
        f = load_factors(profile, rec.name)
        got = {}
        for way, fwht in (("butterfly", butterfly_fwht), ("tiled", hadamard.fwht)):
            with using(fwht):
                t0 = time.perf_counter()
                got[way] = layer_coefficients(f, rec.weight_sq_norm)
                seconds[way] += time.perf_counter() - t0
        a, b = got["butterfly"], got["tiled"]
        for k in ("yaqa_gain", "yaqa_gain_heldout", "yaqa_gain_heldout_raw", "ldlq_gain_heldout"):
            diff = max(diff, abs(getattr(b, k) / getattr(a, k) - 1))
        lam_same &= (a.shrink_out, a.shrink_in) == (b.shrink_out, b.shrink_in)
    table = Table(title=f"coefficient phase: {len(layers)} layers of {profile} (blocks {sorted(blocks)})")
    for col in ("way", "seconds", "÷ butterfly"):
        table.add_column(col, justify="left" if col == "way" else "right")
    for way, sec in seconds.items():
        table.add_row(way, f"{sec:.1f}", f"{sec / seconds['butterfly']:.3f}")
    console.print(table)
    console.print(f"largest relative difference in a gain: {diff:.1e}; every λ pair the same: {lam_same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="192,576,1536,4096", help="factor sizes n (the default model's, and 4096)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--profile", type=Path, help="a finished profile: also time its coefficient phase both ways")
    ap.add_argument("--blocks", default="5,20", help="with --profile: the blocks whose layers are timed")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    table = Table(title=f"R H Rᵀ of a float64 n×n factor, {torch.get_num_threads()} threads "
                        "(median ms over alternated runs)")
    for col in ("n", "construction", "butterfly ms", "tiled ms", "ratio", "max |diff| / max"):
        table.add_column(col, justify="right")
    for n in (int(v) for v in args.widths.split(",")):
        A = torch.randn(n, n, dtype=torch.float64, generator=gen)
        H = A @ A.T / n
        ref, new = rotate_with(butterfly_fwht, H, 7), rotate_factor(H, 7)
        diff = float((new - ref).abs().max() / H.abs().max())
        ms = alternated_ms({"butterfly": lambda: rotate_with(butterfly_fwht, H, 7),
                            "tiled": lambda: rotate_factor(H, 7)}, args.reps)
        o, t = ms["butterfly"], ms["tiled"]
        table.add_row(str(n), hadamard.describe(n), f"{o:.1f}", f"{t:.1f}", f"{t / o:.3f}", f"{diff:.1e}")
    console = Console()
    console.print(table)
    if args.profile is not None:
        coefficient_phase(args.profile, {int(b) for b in args.blocks.split(",")}, console)


if __name__ == "__main__":
    main()
