"""Independent references for the solver tests: brute force over assignments, storage and cost from scratch."""
from __future__ import annotations

import itertools

import numpy as np

from bitplan.formats import get_format
from bitplan.solve.mckp import Problem


def brute_force(problem: Problem) -> float | None:
    """Optimal cost by enumerating every assignment (codebooks and a second resource included), or None."""
    combos = np.array(list(itertools.product(*[range(b.size) for b in problem.bits])), dtype=np.int64)
    bits = sum(b[combos[:, k]] for k, b in enumerate(problem.bits))
    cost = sum(c[combos[:, k]] for k, c in enumerate(problem.cost))
    if problem.codebook is not None:
        for g, extra in enumerate(problem.codebook_bits):
            used = np.zeros(len(combos), dtype=bool)
            for k, ids in enumerate(problem.codebook):
                used |= ids[combos[:, k]] == g
            bits = bits + used * int(extra)
    ok = bits <= problem.budget
    if problem.resource is not None:
        ok &= sum(r[combos[:, k]] for k, r in enumerate(problem.resource)) <= problem.resource_limit
    return float(cost[ok].min()) if ok.any() else None


def brute_force_fewest_bits(problem: Problem) -> int:
    """The fewest storage bits of any assignment, codebooks included, by enumerating every assignment."""
    combos = itertools.product(*[range(b.size) for b in problem.bits])
    return min(problem.evaluate(np.array(c))[1] for c in combos)


def random_problem(rng: np.random.Generator, items: int, options: int, slack: float | None = None,
                   codebooks: bool = False, resource: bool = False, shapes: int | None = None) -> Problem:
    """Integer bits (so a DP with 1-bit cells is exact); costs falling with bits like real formats, with noise.

    `shapes`: draw the items' bit vectors from this many templates, as layers of equal shape share them."""
    size = rng.integers(1, 40, items)
    templates = [np.sort(rng.integers(1, 17, options)) for _ in range(shapes or items)]
    bits, cost = [], []
    for k in range(items):
        if shapes:
            t = int(rng.integers(0, shapes))
            bpw, extra = templates[t], 0
            size[k] = 8 * (t + 1)
        else:
            bpw, extra = rng.integers(1, 17, options), rng.integers(0, 4, options)
        bits.append(bpw * size[k] + extra)
        cost.append(rng.lognormal(0, 1) * 4.0 ** (-bpw / 2) * rng.uniform(0.5, 1.5, options))
    lo = sum(int(b.min()) for b in bits)
    hi = sum(int(b.max()) for b in bits)
    frac = rng.uniform(-0.05, 1.05) if slack is None else slack
    kw = {}
    if codebooks:
        kw.update(codebook=[rng.integers(-1, 3, options) for _ in range(items)],
                  codebook_bits=rng.integers(0, 3 * int(size.mean()) + 1, 3))
    if resource:
        res = [rng.uniform(0, 1, options) for _ in range(items)]
        kw.update(resource=res, resource_limit=float(sum(r.min() for r in res) + rng.uniform(0, 0.6) *
                                                     sum(r.max() - r.min() for r in res)))
    return Problem(bits, cost, int(lo + frac * (hi - lo)), **kw)


def codebook_grid(name: str) -> str | None:
    """The grid table a format stores, read from its name alone: higgs-p{p}-n{n}-g{g} → (p, n)."""
    if not name.startswith("higgs-"):
        return None
    p, n, _ = name.split("-")[1:]
    return f"{p}-{n}"


def storage_and_cost(profile, formats: dict[str, str], objective: str) -> tuple[int, float]:
    """Block-linear storage (codebooks once per grid) and predicted ΔKL of an assignment, from first principles."""
    bits, cost, grids = 0, 0.0, {}
    for rec in profile.layers:
        f = get_format(formats[rec.name])
        bits += f.storage_bits(*rec.shape)
        t2 = rec.rel_err.get(f.name, f.mse_q)
        cost += rec.alpha(objective) * t2
        grid = codebook_grid(f.name)
        if grid is not None:
            grids[grid] = f.codebook_bits
    return bits + sum(grids.values()), cost


def profile_brute_force(profile, options: dict[str, list[str]], groups: list[list[str]], budget_bits: int,
                        objective: str) -> tuple[float, dict[str, str]] | None:
    """Best tie-consistent assignment within `budget_bits` (block linears + codebooks), by enumeration.

    options: allowed format names per layer; groups: layers that must share a format (the rest alone)."""
    by_name = {r.name: r for r in profile.layers}
    grouped = {n for g in groups for n in g}
    units = [list(g) for g in groups] + [[r.name] for r in profile.layers if r.name not in grouped]
    unit_opts = []
    for unit in units:
        allowed = [f for f in options[unit[0]] if all(f in options[n] for n in unit)]
        if not allowed:
            return None
        unit_opts.append(allowed)
    grids = sorted({codebook_grid(f) for opts in unit_opts for f in opts} - {None})
    bits_u, cost_u, grid_u = [], [], []
    for unit, opts in zip(units, unit_opts):
        fmts = [get_format(f) for f in opts]
        bits_u.append(np.array([sum(f.storage_bits(*by_name[n].shape) for n in unit) for f in fmts]))
        cost_u.append(np.array([sum(by_name[n].alpha(objective) * by_name[n].rel_err.get(f.name, f.mse_q)
                                    for n in unit) for f in fmts]))
        grid_u.append([codebook_grid(f) for f in opts])
    combos = np.array(list(itertools.product(*[range(len(o)) for o in unit_opts])), dtype=np.int64)
    bits = sum(b[combos[:, k]] for k, b in enumerate(bits_u))
    cost = sum(c[combos[:, k]] for k, c in enumerate(cost_u))
    for g in grids:
        used = np.zeros(len(combos), dtype=bool)
        for k, gs in enumerate(grid_u):
            used |= np.array([x == g for x in gs])[combos[:, k]]
        p, n = (int(v[1:]) for v in g.split("-"))
        bits = bits + used * (32 * n * p)  # a grid table: n points of p fp32 coordinates
    ok = bits <= budget_bits
    if not ok.any():
        return None
    best = int(np.flatnonzero(ok)[np.argmin(cost[ok])])
    assignment = {n: unit_opts[k][combos[best, k]] for k, unit in enumerate(units) for n in unit}
    return float(cost[best]), assignment
