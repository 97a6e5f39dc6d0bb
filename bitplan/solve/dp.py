"""Exact dynamic program for the multiple-choice knapsack over a discretized bit axis.

Bits are counted in cells of `quantum` bits. Every option's bits are rounded UP to whole cells and the budget DOWN,
so any solution of the discretized problem also fits the true budget; with `quantum` dividing every option's bits
(e.g. 1) the discretized problem is the true one and the result is the exact optimum.

Speed comes from shrinking the problem without losing the optimum (all steps are exact):
- Pareto pruning: an option with more cells and no lower cost than another option of the item is never needed.
- Lagrangian reduction: for any λ ≥ 0, every solution costs at least L(λ) = Σ_k min_j (c_kj + λ d_kj) − λ S plus its
  options' reduced costs rc_kj = c_kj + λ d_kj − min_j(...). With UB the cost of a known feasible solution, an option
  with rc > UB − L(λ) cannot be in an optimal solution, and a DP state (items 1..l using b cells at cost F) cannot lead
  to one if F + Σ_{k>l} min_j (c_kj + λ d_kj) − λ (S − b) > UB. In practice this leaves a handful of options per item
  and a narrow band of states around the LP relaxation's path.
- The DP runs on bit offsets from each item's cheapest option, in a window of reachable, unpruned states; one
  vectorized min over an (options × window) array per item, with an int8/int16 argmin table for back-tracking.

Grid codebooks (paid once per checkpoint for each grid used) do not decompose over items: `solve_dp` handles them
with a sequence of exact DPs over chosen sets of grids (see its docstring); the ILP treats them exactly.
"""
from __future__ import annotations

import time

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import BitplanError
from .mckp import Problem, Solution, charged_grids, pareto, table_free

_TOGGLE_ROUNDS = 6   # local search over which grids to pay for: rounds, and DPs tried per round
_TOGGLE_TRIES = 3


def solve_dp(problem: Problem, quantum: int = 1, reduce: bool = True, polish: bool = True) -> Solution:
    """Minimize cost within the budget; `quantum` is the cell size in bits (1 = exact).

    Codebooks (a per-checkpoint cost shared by every layer using one grid) do not decompose over items, so the DP
    handles them in two steps, each a sequence of exact DPs:
    - reserve: solve for `budget − R`; if the solution plus its own codebooks exceeds the budget, raise R to those
      codebooks and solve again. R only grows (a solution whose codebooks fit in R fits the budget), so this stops.
    - choose which grids to pay for: with λ the budget's Lagrange multiplier, a grid is worth its table if the
      layers using it would lose more than λ × its bits by moving to their next best option. Grids that do not pay
      for themselves are dropped (greedy, as for facility location) and the DP is solved again over the rest;
      then a local search adds or drops one grid at a time (the most promising by that estimate first), each
      move one exact DP over the allowed grids. The best feasible solution is kept. Choosing the grid set this way
      is a heuristic (it met CBC's optimum on the SmolLM2-shaped tests); `--solver ilp` treats codebooks exactly.

    With cells coarser than the options' bits, rounding up leaves some true bits unused; `polish` spends them on
    greedy upgrades (only to options whose codebook is already paid for), which can only lower the cost.
    `stats["lower_bound"]` is a Lagrangian bound on the exact problem, with the tables charged (`codebook_bound`):
    the solution is within `cost − lower_bound` of the true optimum, and `optimal` says that this is proven zero.
    """
    if problem.resource is not None:
        raise BitplanError("a second resource constraint needs --solver ilp (the DP handles one budget only)")
    quantum = int(quantum)
    if quantum < 1:
        raise BitplanError(f"the DP quantum must be a positive number of bits, not {quantum}")
    t0 = time.perf_counter()
    B, C, G = problem.padded()
    cb = problem.codebook_bits if problem.codebook is not None else np.zeros(0, dtype=np.int64)
    charged = charged_grids(G, cb)
    best, tried = None, 0

    def attempt(allowed: set[int] | None) -> None:
        nonlocal best, tried
        tried += 1
        try:
            ch, q2, st = _reserved(problem, B, C, G, quantum, reduce, polish, allowed)
        except BitplanError:
            return  # with this reserve (or without those grids) the budget cannot be met
        cost = problem.evaluate(ch)[0]
        if best is None or cost < best[0] - _tol(cost, best[0]):
            best = (cost, ch, st, q2, allowed is None)

    attempt(None)
    if best is None and charged:  # reserving what the DP picked overshot: the fewest-bits grids always fit
        attempt(problem.codebooks_used(problem.fewest_bits()) & set(charged))
    if best is None:
        lo = problem.bit_range()[0]
        raise BitplanError(f"budget of {problem.budget} bits is below the smallest achievable {lo} bits")
    if charged and problem.codebooks_used(best[1]) & set(charged):
        attempt(_priced_grids(B, C, G, cb, set(charged), problem.budget))
        for _ in range(_TOGGLE_ROUNDS):  # local search: add or drop one grid at a time, best estimates first
            before = best[0]
            used = problem.codebooks_used(best[1]) & set(charged)
            for g in _toggles(B, C, G, cb, best[1], used, set(charged), problem.budget)[:_TOGGLE_TRIES]:
                attempt(used ^ {g})
            if best[0] >= before:
                break
    _, choice, stats, q, unrestricted = best
    stats["grid_sets_tried"] = tried
    cost, bits = problem.evaluate(choice)
    low = B.min(axis=1, keepdims=True)
    lam, _, lower_bound, _ = _lagrangian(B - low, C, problem.budget - int(low.sum()), upper=False)
    if charged:  # the tables are part of the budget: charging them tightens the bound
        lower_bound = max(lower_bound, codebook_bound(B, C, G, cb, problem.budget, lam))
    stats.update(quantum=q, codebooks_used=int(problem.codebook_total(choice)), lower_bound=lower_bound,
                 seconds=time.perf_counter() - t0)
    optimal = cost - lower_bound <= _tol(cost, lower_bound)
    if not optimal and unrestricted and stats.get("codebook_reserve") == 0 and np.all(B % q == 0):
        optimal = True  # exact cells, all grids allowed, none reserved: the DP's optimum is the problem's
    return Solution(choice=choice, cost=cost, bits=bits, optimal=bool(optimal), stats=stats)


def codebook_bound(B: np.ndarray, C: np.ndarray, G: np.ndarray, cb: np.ndarray, budget: int, lam: float) -> float:
    """A lower bound on the problem with the grids' tables charged, at multiplier λ ≥ 0.

    Every feasible solution (options x, grid set Y) has Σ_k b_kx + Σ_{g∈Y} cb_g ≤ S, so its cost is at least
    Σ_k (c_kx + λ b_kx) + λ Σ_{g∈Y} cb_g − λ S ≥ min_Y [Σ_k min_{j allowed by Y} a_kj + Σ_{g∈Y} f_g] − λ S, with
    a = c + λ b and f_g = λ cb_g: an uncapacitated facility-location problem (the grids are the facilities).
    Any v feasible for its LP dual (Σ_k max(0, v_k − a_kg) ≤ f_g for every grid g, v_k ≤ the item's best
    table-free option) bounds that min by Σ_k v_k; v comes from Erlenkotter's dual ascent (Oper. Res. 26, 1978):
    from each item's best option, raise each v_k to its next breakpoint while the grids it already reaches have
    slack. Without tables to charge this is the plain Lagrangian bound."""
    A = C + lam * B.astype(np.float64)
    a_free = np.where(table_free(G, cb), A, np.inf).min(axis=1)
    grids = charged_grids(G, cb)
    a = np.stack([np.where(G == g, A, np.inf).min(axis=1) for g in grids], axis=1)   # items × grids
    v = np.minimum(a_free, a.min(axis=1))
    slack = lam * cb[grids].astype(np.float64) - np.clip(v[:, None] - a, 0, None).sum(axis=0)
    levels = [np.unique(np.append(a[k][np.isfinite(a[k])], a_free[k])) for k in range(len(v))]
    for _ in range(4 * a.shape[1] + 4):   # passes; each raises every item by at most one breakpoint
        raised = False
        for k in range(len(v)):
            if v[k] >= a_free[k]:
                continue
            above = levels[k][levels[k] > v[k]]
            step = (above[0] if above.size else np.inf) - v[k]
            reached = a[k] <= v[k]
            if reached.any():
                step = min(step, float(slack[reached].min()))
            if step <= 0 or not np.isfinite(step):
                continue
            v[k] += step
            slack[reached] -= step
            raised = True
        if not raised:
            break
    return float(v.sum() - lam * budget)


def _reserved(problem: Problem, B: np.ndarray, C: np.ndarray, G: np.ndarray, quantum: int, reduce: bool,
              polish: bool, allowed: set[int] | None) -> tuple[np.ndarray, int, dict]:
    """The reserve loop over exact DPs, on options whose codebook is in `allowed` (None: all)."""
    if allowed is not None and problem.codebook is not None:
        free = table_free(G, problem.codebook_bits)
        C = np.where(free | np.isin(G, list(allowed)), C, np.inf)
        if not np.all(np.isfinite(C).any(axis=1)):
            raise BitplanError("without those grids an item has no option left")
    rows = np.arange(B.shape[0])
    reserve, solves = 0, 0
    while True:
        choice, q, stats = _solve_reserved(B, C, problem.budget - reserve, quantum, reduce)
        solves += 1
        used = problem.codebook_total(choice)
        if int(B[rows, choice].sum()) + used <= problem.budget:
            break
        if used <= reserve:  # cannot happen: items fit budget − reserve and codebooks fit the reserve
            raise AssertionError("DP solution exceeds its budget")
        reserve = used
    if polish:
        paid = (G < 0) | np.isin(G, list(problem.codebooks_used(choice)))
        left = problem.budget - used - int(B[rows, choice].sum())
        choice = _fill(B, np.where(paid, C, np.inf), choice, left)
    stats.update(codebook_reserve=reserve, solves=solves)
    return choice, q, stats


def _lagrange_costs(B, C, G, cb, allowed: set[int], budget: int) -> tuple[float, np.ndarray]:
    """λ for the problem restricted to `allowed` grids (their tables reserved) and the priced costs c + λ·bits."""
    ok = table_free(G, cb) | np.isin(G, list(allowed))
    Cm = np.where(ok, C, np.inf)
    low = B.min(axis=1, keepdims=True)
    slack = budget - (int(cb[list(allowed)].sum()) if allowed else 0) - int(low.sum())
    if slack < 0:
        slack = budget - int(low.sum())
    lam = _lagrangian(B - low, Cm, max(slack, 0), upper=False)[0]
    return lam, C + lam * (B - low).astype(np.float64)


def _toggles(B, C, G, cb, choice: np.ndarray, used: set[int], charged: set[int], budget: int) -> list[int]:
    """Grids to add or drop, most promising first by the Lagrangian estimate of the change in cost."""
    lam, M = _lagrange_costs(B, C, G, cb, used, budget)
    free = table_free(G, cb)
    rows = np.arange(B.shape[0])
    current = M[rows, choice]
    gains = []
    for g in charged:
        if g in used:  # drop: its layers move to their best option among the other paid grids
            allowed = free | (np.isin(G, list(used - {g})))
            users = G[rows, choice] == g
            alt = np.where(allowed, M, np.inf).min(axis=1)
            gains.append((lam * cb[g] - float((alt - current)[users].sum()), g))
        else:  # add: every layer may move to its options on g
            best = np.where(G == g, M, np.inf).min(axis=1)
            gains.append((float(np.maximum(current - best, 0).sum()) - lam * cb[g], g))
    return [g for _, g in sorted(gains, key=lambda t: -t[0])]


def _priced_grids(B: np.ndarray, C: np.ndarray, G: np.ndarray, cb: np.ndarray, allowed: set[int],
                  budget: int) -> set[int]:
    """Greedy facility-location drop at the budget's Lagrange multiplier λ: remove, one at a time, the grid whose
    table costs more (λ × its bits) than its layers lose by moving to their next best option (in c + λ·bits)."""
    lam, M = _lagrange_costs(B, C, G, cb, allowed, budget)
    M = np.where(table_free(G, cb) | np.isin(G, list(allowed)), M, np.inf)
    keep = set(allowed)
    while keep:
        current = M.min(axis=1).sum() + lam * cb[list(keep)].sum()
        best_g, best_total = None, current
        for g in keep:
            total = np.where(G == g, np.inf, M).min(axis=1).sum() + lam * (cb[list(keep)].sum() - cb[g])
            if total < best_total - _tol(total, best_total):
                best_g, best_total = g, total
        if best_g is None:
            break
        keep.discard(best_g)
        M = np.where(G == best_g, np.inf, M)
    return keep


def _solve_reserved(B: np.ndarray, C: np.ndarray, budget: int, quantum: int,
                    reduce: bool) -> tuple[np.ndarray, int, dict]:
    """Solve the items alone within `budget` bits; refine the quantum if rounding up made a feasible budget fail."""
    min_bits = int(B.min(axis=1).sum())
    if budget < min_bits:
        raise BitplanError(f"budget of {budget} bits is below the smallest achievable {min_bits} bits")
    q = quantum
    while True:
        cells = -(-B // q)  # ceil: the discretized solution never exceeds the true budget
        if budget // q >= int(cells.min(axis=1).sum()) or q == 1:
            break
        q = max(1, q // 4)  # rounding up lost the few bits that made the budget feasible: use finer cells
    choice, stats = solve_cells(cells, C, budget // q, tiebreak=B, reduce=reduce)
    return choice, q, stats


def solve_cells(cells: np.ndarray, cost: np.ndarray, budget: int, tiebreak: np.ndarray | None = None,
                reduce: bool = True) -> tuple[np.ndarray, dict]:
    """The DP proper on items × options arrays of integer cells (cost +inf marks padding).

    Returns the column chosen for each item and statistics."""
    cells = np.asarray(cells, dtype=np.int64)
    cost = np.asarray(cost, dtype=np.float64)
    D, C, cols = pareto(cells, cost, cells if tiebreak is None else tiebreak)
    n_items = D.shape[0]
    base = int(D[:, 0].sum())
    D = D - D[:, :1]
    slack = int(budget) - base
    if slack < 0:
        raise BitplanError(f"budget of {budget} cells is below the smallest achievable {base} cells")
    rows = np.arange(n_items)
    stats = {"items": n_items, "options": int(np.isfinite(C).sum()), "slack_cells": slack}

    fixed = np.zeros(n_items, dtype=np.int64)     # chosen column of the pruned arrays, per item
    active = rows
    lam, ub = 0.0, np.inf
    if reduce:
        lam, ub, lb, x_ub = _lagrangian(D, C, slack)
        stats.update(lagrange_lambda=lam, cells_upper_bound=ub, cells_lower_bound=lb)
        if ub - lb <= _tol(ub, lb):  # the feasible solution meets the lower bound: optimal
            stats.update(options_after_reduction=n_items, dp_items=0, dp_work=0)
            return cols[rows, x_ub], stats
        reduced = C + lam * D
        reduced -= reduced.min(axis=1, keepdims=True)
        allowed = reduced <= (ub - lb) + _tol(ub, lb)
        C = np.where(allowed, C, np.inf)
        n_allowed = allowed.sum(axis=1)
        stats["options_after_reduction"] = int(n_allowed.sum())
        single = n_allowed == 1
        fixed[single] = np.argmax(allowed[single], axis=1)
        slack -= int(D[single, fixed[single]].sum())
        active = np.flatnonzero(~single)
    choice, work = _dp(D[active], C[active], slack, lam, ub, reduce)
    fixed[active] = choice
    stats.update(dp_items=int(active.size), dp_work=work)
    return cols[rows, fixed], stats


def _tol(a: float, b: float) -> float:
    # Sums of many float64 terms: a relative slack far above their rounding error keeps the pruning safe.
    return 1e-9 * max(abs(a), abs(b)) + 1e-300


def _lagrangian(D: np.ndarray, C: np.ndarray, slack: int,
                upper: bool = True) -> tuple[float, float, float, np.ndarray | None]:
    """(λ, UB, LB, x): λ ≥ 0 found by bisection to maximize the Lagrangian bound LB; with `upper`, also a feasible
    solution x (the assignment at the smallest feasible λ, then greedily filled) and its cost UB.

    D are per-item offsets (≥ 0) from the item's fewest-bits option, `slack` the budget left after those."""
    rows = np.arange(D.shape[0])
    Df = D.astype(np.float64)

    def pick(lam: float) -> np.ndarray:
        return np.argmin(C + lam * Df, axis=1)  # the first minimum: fewest bits among equals (columns sorted)

    def bound(lam: float) -> float:
        return float((C + lam * Df).min(axis=1).sum() - lam * slack)

    x = pick(0.0)
    if D[rows, x].sum() <= slack:  # every item at its cheapest option fits: optimal
        cost = float(C[rows, x].sum())
        return 0.0, cost, cost, x
    finite = np.isfinite(C)
    cheapest_bits = C[rows, np.argmin(D + np.where(finite, 0, D.max() + 1), axis=1)]
    with np.errstate(invalid="ignore"):
        slopes = np.where(finite & (D > 0), (cheapest_bits[:, None] - C) / np.maximum(Df, 1.0), 0.0)
    lo, hi = 0.0, float(slopes.max()) * 2 + 1.0  # at hi every item takes its fewest-bits option
    for _ in range(100):  # any λ gives valid bounds; a closer one only prunes more
        mid = 0.5 * (lo + hi)
        if D[rows, pick(mid)].sum() <= slack:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-7 * hi:
            break
    lam = lo if bound(lo) >= bound(hi) else hi
    lb = max(bound(lo), bound(hi))
    if not upper:
        return lam, np.inf, lb, None
    x = _fill(D, C, pick(hi), slack - int(D[rows, pick(hi)].sum()))
    return lam, float(C[rows, x].sum()), lb, x


def _fill(D: np.ndarray, C: np.ndarray, x: np.ndarray, left: int) -> np.ndarray:
    """Greedy upgrades of a feasible assignment into the `left` units it leaves: rounds of best gain per unit."""
    rows = np.arange(D.shape[0])
    x = x.copy()
    for _ in range(50):
        dd = D - D[rows, x][:, None]
        gain = C[rows, x][:, None] - C
        ok = (dd > 0) & (dd <= left) & (gain > 0)
        if not ok.any():
            break
        ratio = np.where(ok, gain / np.maximum(dd, 1), -1.0)
        best = ratio.argmax(axis=1)
        items = np.flatnonzero(ratio[rows, best] > 0)
        items = items[np.argsort(-ratio[items, best[items]], kind="stable")]
        take = np.cumsum(dd[items, best[items]]) <= left
        take[0] = True  # the best one fits by construction
        items = items[take]
        left -= int(dd[items, best[items]].sum())
        x[items] = best[items]
    return x


def _dp(D: np.ndarray, C: np.ndarray, slack: int, lam: float, ub: float, prune: bool) -> tuple[np.ndarray, int]:
    """Forward pass over items with exact-usage states in a sliding window, then back-tracking."""
    n_items, width = D.shape
    if n_items == 0:
        return np.zeros(0, dtype=np.int64), 0
    # Lower bound on the cost of items l+1.. for the state pruning (0 when not pruning).
    item_min = (C + lam * D).min(axis=1) if prune else np.zeros(n_items)
    rest = np.concatenate([np.cumsum(item_min[::-1])[::-1][1:], [0.0]])
    ctype = np.int8 if width <= 127 else np.int16
    F = np.zeros(1)
    lo = 0
    tables: list[tuple[int, np.ndarray]] = []
    cells = 0
    for k in range(n_items):
        d, c = D[k], C[k]
        ok = np.isfinite(c)
        d, c, cols = d[ok], c[ok], np.flatnonzero(ok)
        maxd = int(d.max())
        wp = F.size
        wn = min(slack - lo + 1, wp + maxd)
        P = np.concatenate([np.full(maxd, np.inf), F, np.full(max(0, wn - wp), np.inf)])
        G = sliding_window_view(P, wn)[maxd - d]
        G = G + c[:, None]
        F = G.min(axis=0)
        arg = (G == F).argmax(axis=0)
        if prune:
            threshold = ub + _tol(ub, 0.0) - rest[k] + lam * slack
            dead = F + lam * (lo + np.arange(wn)) > threshold
            F[dead] = np.inf
        alive = np.flatnonzero(np.isfinite(F))
        if alive.size == 0:
            raise AssertionError("DP pruned every state; the upper bound was not feasible")
        first, last = int(alive[0]), int(alive[-1])
        F = F[first:last + 1]
        tables.append((lo + first, cols[arg[first:last + 1]].astype(ctype)))
        lo += first
        cells += wn * d.size
    t = int(np.argmin(F))  # first minimum: the fewest bits among equally good solutions
    b = lo + t
    out = np.empty(n_items, dtype=np.int64)
    for k in range(n_items - 1, -1, -1):
        start, table = tables[k]
        j = int(table[b - start])
        out[k] = j
        b -= int(D[k, j])
    assert b == 0
    return out, cells
