"""Solver speed and memory on synthetic profiles: 200, 2,000 and 20,000 layers × 40 formats.

    python benchmarks/solve_bench.py [--sizes 200,2000,20000] [--resolution 1e-4] [--ilp-limit 60]

Layers have Llama-3-8B shapes (q/o 4096², k/v 1024×4096, gate/up 14336×4096, down 4096×14336), coefficients and
measured t² as in bitplan.solve.synthetic, the budget is 3.25 bpw. Times are for the solve alone (the instance is
built once, `build` column); peak memory is Python-side (tracemalloc) for the solve, plus CBC's own peak RSS.
"""
from __future__ import annotations

import argparse
import math
import resource
import time
import tracemalloc

from rich.console import Console
from rich.table import Table

from bitplan.errors import BitplanError
from bitplan.formats import default_candidates, get_format
from bitplan.solve.api import quantum_bits, resolve_budget
from bitplan.solve.dp import solve_dp
from bitplan.solve.ilp import solve_ilp
from bitplan.solve.problem import build_instance
from bitplan.solve.synthetic import synthetic_profile

LLAMA_8B = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
            "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}


def formats_40():
    fmts = default_candidates()
    return fmts + [get_format("int4-g32")] if len(fmts) == 39 else fmts[:40]


def instance(layers: int, seed: int = 0):
    prof = synthetic_profile(blocks=math.ceil(layers / 7), shapes=LLAMA_8B, formats=formats_40(), seed=seed)
    prof.layers = prof.layers[:layers]
    t0 = time.perf_counter()
    inst = build_instance(prof, formats=[f.name for f in formats_40()])
    return inst, time.perf_counter() - t0


def measure(fn):
    """(result, seconds, peak MB): time in a plain run, memory in a second run under tracemalloc."""
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return result, seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="200,2000,20000")
    ap.add_argument("--resolution", type=float, default=1e-4, help="DP cell in bits per weight")
    ap.add_argument("--budget", default="3.25bpw")
    ap.add_argument("--ilp-limit", type=float, default=60.0, help="CBC time limit, seconds")
    ap.add_argument("--plain-upto", type=int, default=2000, help="also run the DP without reduction up to this size")
    args = ap.parse_args()
    console = Console(width=max(Console().width, 150))
    table = Table(title=f"bitplan solve: {args.budget}, 40 candidate formats, DP cells of {args.resolution:g} bpw")
    for col in ("layers", "solver", "build s", "solve s", "peak MB", "CBC RSS MB", "storage bpw", "predicted ΔKL",
                "vs best", "status"):
        table.add_column(col, justify="left" if col in ("solver", "status") else "right")
    for layers in (int(s) for s in args.sizes.split(",")):
        inst, build_s = instance(layers)
        target = resolve_budget(inst, args.budget)
        problem = inst.problem(target.layer_bits)
        q = quantum_bits(inst, args.resolution)
        runs = [("dp", lambda: solve_dp(problem, q))]
        if layers <= args.plain_upto:
            runs.append(("dp, no reduction", lambda: solve_dp(problem, q, reduce=False)))
        runs.append((f"dp @ 1e-6 bpw", lambda: solve_dp(problem, quantum_bits(inst, 1e-6))))
        runs.append(("ilp (CBC)", lambda: solve_ilp(problem, time_limit=args.ilp_limit)))
        results = []
        for name, fn in runs:
            cbc_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            try:
                if name.startswith("ilp"):  # one run: CBC's memory is its own process
                    t0 = time.perf_counter()
                    sol, seconds, peak = fn(), None, None
                    seconds = time.perf_counter() - t0
                else:
                    sol, seconds, peak = measure(fn)
            except BitplanError as e:
                results.append((name, None, None, None, None, str(e)))
                continue
            cbc = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            status = sol.stats.get("status") or ("optimal" if sol.optimal else
                                                 f"≤ {(sol.cost - sol.stats['lower_bound']) / sol.cost:.1e} "
                                                 f"above a lower bound")
            results.append((name, sol, seconds, peak, cbc if name.startswith("ilp") and cbc > cbc_before else None,
                            status))
        best = min(r[1].cost for r in results if r[1] is not None)
        for name, sol, seconds, peak, cbc, status in results:
            if sol is None:
                table.add_row(str(layers), name, f"{build_s:.2f}", "–", "–", "–", "–", "–", "–", status[:60])
                continue
            table.add_row(str(layers), name, f"{build_s:.2f}", f"{seconds:.3f}",
                          "–" if peak is None else f"{peak:.1f}", "–" if cbc is None else f"{cbc / 1024:.0f}",
                          f"{sol.bits / inst.block_weights:.5f}", f"{sol.cost:.6g}", f"{sol.cost / best:.6f}",
                          status.replace("(feasible, not proven optimal)", "(feasible)"))
    console.print(table)


if __name__ == "__main__":
    main()
