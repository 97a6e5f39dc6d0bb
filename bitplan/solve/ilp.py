"""The same knapsack as an integer program, solved by CBC through PuLP.

x[k, j] ∈ {0, 1} picks option j of item k (Σ_j x[k, j] = 1). The bit budget is one exact integer constraint;
a grid's codebook is paid through y[g] ≥ x[k, j] for every option using it, which makes codebooks exact here
(the DP reserves them instead). A second resource is one more linear constraint. Tie groups and pins arrive
already folded into the items and their options (see problem.py).
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import pulp

from ..errors import BitplanError
from .mckp import Problem, Solution, pareto


def solve_ilp(problem: Problem, time_limit: float | None = None, start: np.ndarray | None = None) -> Solution:
    """Minimize cost within the budget (and the resource limit); optimal unless `time_limit` cut CBC short.

    `start`: a feasible assignment (e.g. the DP's) handed to CBC as its first incumbent; CBC still proves
    optimality (or improves on it) under a zero gap."""
    t0 = time.perf_counter()
    keep = _prunable(problem)
    # Bits in units of their gcd: the same integer constraint with smaller coefficients for CBC.
    unit = int(np.gcd.reduce(np.concatenate([b[k] for b, k in zip(problem.bits, keep)]
                                            + ([problem.codebook_bits] if problem.codebook is not None else []))))
    unit = max(unit, 1)
    budget = problem.budget
    for attempt in range(4):
        choice, status, build_s = _solve_once(problem, keep, unit, budget // unit, time_limit, start)
        if choice is None:
            break
        cost, bits = problem.evaluate(choice)
        over = bits - problem.budget
        res_over = problem.resource_used(choice) - problem.resource_limit if problem.resource is not None else 0.0
        if over <= 0 and res_over <= 1e-9 * max(1.0, abs(problem.resource_limit or 0.0)):
            break
        # CBC's feasibility tolerance let an assignment slightly over the budget through: tighten and retry.
        budget -= max(over, unit)
    else:
        raise BitplanError("the ILP solver kept returning assignments over the budget; try --solver dp")
    if choice is None:
        if status == "infeasible":
            raise BitplanError("no assignment meets the budget" +
                               (" and the resource limit" if problem.resource is not None else "") +
                               " under these constraints")
        raise BitplanError(f"the ILP solver found no solution within {time_limit:g} s; raise the time limit "
                           f"or use --solver dp")
    stats = {"status": status, "unit_bits": unit, "build_seconds": build_s, "seconds": time.perf_counter() - t0,
             "variables": int(sum(k.size for k in keep))}
    return Solution(choice=choice, cost=cost, bits=bits, optimal=status == "optimal", stats=stats)


def _prunable(problem: Problem) -> list[np.ndarray]:
    """Options worth a variable: without codebooks or a second resource, dominated ones can go (exact)."""
    if (problem.codebook is not None and np.any(problem.codebook_bits > 0)) or problem.resource is not None:
        return [np.arange(b.size) for b in problem.bits]
    B, C, _ = problem.padded()
    _, Cp, cols = pareto(B, C, B)
    return [cols[k][np.isfinite(Cp[k])] for k in range(B.shape[0])]


def _binary(lp: pulp.LpProblem, name: str) -> pulp.LpVariable:
    if hasattr(lp, "add_variable"):  # PuLP ≥ 3.3 attaches variables to the model
        return lp.add_variable(name, cat=pulp.LpBinary)
    return pulp.LpVariable(name, cat=pulp.LpBinary)


def _solve_once(problem: Problem, keep: list[np.ndarray], unit: int, budget_units: int,
                time_limit: float | None, start: np.ndarray | None) -> tuple[np.ndarray | None, str, float]:
    t0 = time.perf_counter()
    lp = pulp.LpProblem("bitplan", pulp.LpMinimize)
    # CBC's tolerances are absolute (a new incumbent must beat the last by its cutoff increment): scale costs so
    # that 1e-9 of the objective is far above them.
    scale = max(sum(float(np.abs(c).max()) for c in problem.cost), 1e-300) / 1e6
    x = [[_binary(lp, f"x_{k}_{j}") for j in idx] for k, idx in enumerate(keep)]
    lp += pulp.LpAffineExpression(
        [(v, float(problem.cost[k][j]) / scale) for k, idx in enumerate(keep) for v, j in zip(x[k], idx)])
    for k, row in enumerate(x):
        lp += pulp.LpAffineExpression([(v, 1) for v in row]) == 1, f"one_{k}"
    terms = [(v, int(problem.bits[k][j]) // unit) for k, idx in enumerate(keep) for v, j in zip(x[k], idx)]
    if problem.codebook is not None:
        used = sorted({int(g) for gs in problem.codebook for g in gs if g >= 0 and problem.codebook_bits[g] > 0})
        y = {g: _binary(lp, f"y_{g}") for g in used}
        for k, idx in enumerate(keep):
            for v, j in zip(x[k], idx):
                g = int(problem.codebook[k][j])
                if g in y:
                    lp += v <= y[g], f"cb_{k}_{j}"
        terms += [(y[g], int(problem.codebook_bits[g]) // unit) for g in used]
    lp += pulp.LpAffineExpression(terms) <= budget_units, "bits"
    if problem.resource is not None:
        lp += pulp.LpAffineExpression(
            [(v, float(problem.resource[k][j])) for k, idx in enumerate(keep) for v, j in zip(x[k], idx)]
        ) <= float(problem.resource_limit), "resource"
    if start is not None:
        for k, idx in enumerate(keep):
            for v, j in zip(x[k], idx):
                v.setInitialValue(1 if j == start[k] else 0)
        if problem.codebook is not None:
            paid = problem.codebooks_used(start)
            for g, v in y.items():
                v.setInitialValue(1 if g in paid else 0)
    build_s = time.perf_counter() - t0
    # No `threads` option: the bundled CBC 2.10.3 started with `-threads 1` can idle 10 s waiting on its worker.
    # "preprocess off": the bundled CBC 2.10.3's preprocessing wrongly fixed every variable on small tied instances
    # (returned a worse assignment as "optimal"); "increment 0": accept any strictly better incumbent.
    with warnings.catch_warnings():  # PuLP 3.x deprecates the bundled CBC; it is the one we ship with
        warnings.simplefilter("ignore", DeprecationWarning)
        cmd = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=0.0, gapAbs=0.0,
                                options=["increment 0", "preprocess off"],
                                warmStart=start is not None)
    lp.solve(cmd)
    if lp.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        status = "optimal" if lp.sol_status == pulp.LpSolutionOptimal else "time limit (feasible, not proven optimal)"
        choice = np.array([idx[int(np.argmax([v.varValue or 0.0 for v in row]))] for row, idx in zip(x, keep)],
                          dtype=np.int64)
        return choice, status, build_s
    if lp.status == pulp.LpStatusInfeasible or lp.sol_status == pulp.LpSolutionInfeasible:
        return None, "infeasible", build_s
    return None, pulp.LpStatus.get(lp.status, "unknown"), build_s
