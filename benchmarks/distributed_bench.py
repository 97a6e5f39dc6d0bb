"""Profile wall time with 1 and with N processes (torchrun, gloo) on the same model and calibration.

    python benchmarks/distributed_bench.py [--model smollm2-135m] [--processes 2] [--samples 64]
           [--formats int3-g128,int4-g128] [--work runs/distributed-bench]

Each run is a fresh `bitplan profile` in its own folder; with N processes each gets cores/N threads, so both runs
use the whole machine. Prints each phase's wall time (rank 0's clock), rank 0's peak memory and the speed-up, and
checks that the two profiles agree (largest relative difference of any layer's coefficients).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bitplan.data import DEFAULT_CALIBRATION
from bitplan.profile import load_profile

PHASES = ("noise", "factors", "layers", "formats")


def run_profile(processes: int, out: Path, args) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cores = os.cpu_count() or 1
    profile = ["profile", args.model, "--calib", args.calib, "--samples", str(args.samples), "--formats", args.formats,
               "--noise-samples", str(args.noise_samples), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // processes)))
    if processes == 1:
        cmd = [sys.executable, "-m", "bitplan", *profile]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "bitplan", *profile]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def largest_difference(a, b) -> float:
    worst = 0.0
    for ra, rb in zip(a.layers, b.layers):
        for key in ("alpha_hessian", "alpha_yaqa", "alpha_yaqa_heldout", "alpha_noise", "trace_h_in", "trace_h_out"):
            x, y = getattr(ra, key), getattr(rb, key)
            if x is not None and y is not None and x != 0:
                worst = max(worst, abs(x - y) / abs(x))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default=DEFAULT_CALIBRATION)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--noise-samples", type=int, default=1)
    parser.add_argument("--formats", default="int3-g128,int4-g128")
    parser.add_argument("--work", type=Path, default=Path("runs/distributed-bench"))
    args = parser.parse_args()
    console = Console()
    walls, profiles = {}, {}
    for n in (1, args.processes):
        console.print(f"profiling with {n} process(es)…")
        walls[n] = run_profile(n, args.work / f"p{n}", args)
        profiles[n] = load_profile(args.work / f"p{n}")
    table = Table(title=f"{args.model}: bitplan profile, {args.samples} windows × 256 tokens, "
                        f"{os.cpu_count()} cores, {args.formats}")
    table.add_column("processes")
    for col in (*PHASES, "total (command)", "peak RSS, rank 0", "speed-up"):
        table.add_column(col, justify="right")
    for n, prof in profiles.items():
        timing = prof.extra["timing_s"]
        table.add_row(str(n), *(f"{timing.get(p, 0):.0f} s" for p in PHASES), f"{walls[n]:.0f} s",
                      f"{prof.extra['peak_rss_gb']:.2f} GB", f"{walls[1] / walls[n]:.2f} ×")
    console.print(table)
    console.print(f"largest relative difference of a layer coefficient between the runs: "
                  f"{largest_difference(profiles[1], profiles[args.processes]):.2e}")


if __name__ == "__main__":
    main()
