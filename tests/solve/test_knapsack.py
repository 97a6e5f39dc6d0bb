"""The DP and the ILP on bare knapsacks: against each other, against brute force, and their guarantees."""
from __future__ import annotations

import numpy as np
import pytest

from bitplan.errors import BitplanError
from bitplan.solve.dp import solve_dp
from bitplan.solve.ilp import solve_ilp
from bitplan.solve.mckp import Problem

from .helpers import brute_force, brute_force_fewest_bits, random_problem


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def test_dp_and_ilp_reach_the_same_optimum_on_200_random_instances():
    rng = np.random.default_rng(2024)
    for i in range(200):
        # half the instances repeat bit vectors across items, like layers of one shape (a CBC preprocessing bug
        # returned a wrong "optimal" assignment on such instances)
        p = random_problem(rng, int(rng.integers(2, 25)), int(rng.integers(2, 9)), slack=rng.uniform(0.02, 0.98),
                           shapes=int(rng.integers(1, 4)) if i % 2 else None)
        dp, ilp = solve_dp(p), solve_ilp(p)
        assert dp.bits <= p.budget and ilp.bits <= p.budget
        assert _rel(dp.cost, ilp.cost) <= 1e-9, (dp.cost, ilp.cost)
        assert dp.optimal and ilp.optimal  # 1-bit cells: the DP's discretized problem is the problem


def test_both_equal_brute_force_on_small_instances_including_infeasible_budgets():
    rng = np.random.default_rng(7)
    infeasible = 0
    for _ in range(150):
        p = random_problem(rng, int(rng.integers(1, 7)), int(rng.integers(1, 6)))
        ref = brute_force(p)
        if ref is None:
            infeasible += 1
            with pytest.raises(BitplanError):
                solve_dp(p)
            with pytest.raises(BitplanError):
                solve_ilp(p)
            continue
        for sol in (solve_dp(p), solve_dp(p, reduce=False), solve_ilp(p)):
            assert sol.bits <= p.budget
            assert _rel(sol.cost, ref) <= 1e-9
    assert infeasible > 0  # the generator does produce budgets below the minimum


def test_reduction_is_exact_on_a_realistic_instance():
    """Lagrangian fixing and state pruning must not change the optimum of the discretized problem."""
    rng = np.random.default_rng(3)
    sizes = np.tile([576 * 576, 192 * 576, 192 * 576, 576 * 576, 1536 * 576, 1536 * 576, 576 * 1536], 40)
    bpw = np.array([1.64, 2.14, 2.47, 2.64, 2.81, 3.14, 3.47, 3.64, 4.14, 4.64, 5.14, 6.14, 8.14, 16.0])
    mse = 4.0 ** -bpw * 1.2
    bits = [np.ceil(bpw * s).astype(np.int64) for s in sizes]
    cost = [rng.lognormal(-3, 1) * mse * rng.uniform(0.95, 1.05, bpw.size) for _ in sizes]
    p = Problem(bits, cost, int(3.25 * sizes.sum()))
    quantum = int(1e-4 * sizes.sum())
    fast = solve_dp(p, quantum, reduce=True, polish=False)
    plain = solve_dp(p, quantum, reduce=False, polish=False)
    assert _rel(fast.cost, plain.cost) <= 1e-9
    assert fast.stats["dp_work"] < plain.stats["dp_work"] / 10


def test_coarse_cells_stay_within_budget_and_within_the_rounding_loss_of_the_optimum():
    """With q-bit cells every option rounds up by < q bits, so the DP fits the budget, and it is at least as good
    as the exact optimum of a budget smaller by items × q (every such solution fits the rounded problem)."""
    rng = np.random.default_rng(11)
    for _ in range(60):
        p = random_problem(rng, int(rng.integers(3, 12)), int(rng.integers(2, 7)), slack=rng.uniform(0.3, 0.9))
        q = int(rng.integers(2, 40))
        sol = solve_dp(p, q, polish=False)
        exact = solve_dp(p).cost
        assert sol.bits <= p.budget
        assert sol.cost >= exact - 1e-12 * abs(exact)
        tighter = Problem(p.bits, p.cost, p.budget - p.n_items * q)
        if tighter.budget >= tighter.bit_range()[0]:
            assert sol.cost <= solve_dp(tighter).cost * (1 + 1e-9)
        assert solve_dp(p, q, polish=True).cost <= sol.cost * (1 + 1e-12)  # polishing only ever helps


def test_codebooks_ilp_is_exact_and_dp_stays_feasible():
    rng = np.random.default_rng(5)
    equal = feasible = 0
    for _ in range(80):
        p = random_problem(rng, int(rng.integers(2, 6)), int(rng.integers(2, 5)), codebooks=True,
                           slack=rng.uniform(0.1, 0.9))
        ref = brute_force(p)
        if ref is None:
            continue
        feasible += 1
        ilp, dp = solve_ilp(p), solve_dp(p)
        assert ilp.bits <= p.budget and dp.bits <= p.budget  # codebooks counted once each
        assert _rel(ilp.cost, ref) <= 1e-9
        assert dp.cost >= ref * (1 - 1e-9)
        equal += _rel(dp.cost, ref) <= 1e-9
    assert feasible >= 60 and equal >= 0.9 * feasible  # the grid-set search finds the optimum almost always


def test_codebook_bound_is_a_lower_bound_at_any_multiplier_and_tighter_than_ignoring_the_tables():
    from bitplan.solve.dp import _lagrangian, codebook_bound

    rng = np.random.default_rng(17)
    checked = tighter = 0
    for _ in range(120):
        p = random_problem(rng, int(rng.integers(2, 6)), int(rng.integers(2, 5)), codebooks=True,
                           slack=rng.uniform(0.1, 0.9))
        ref = brute_force(p)
        if ref is None:
            continue
        B, C, G = p.padded()
        low = B.min(axis=1, keepdims=True)
        lam_dp = _lagrangian(B - low, C, p.budget - int(low.sum()), upper=False)[0]
        for lam in (0.0, lam_dp, 0.3 * lam_dp, 3.0 * lam_dp, float(rng.uniform(0, 1e-2))):
            plain = float((C + lam * B).min(axis=1).sum() - lam * p.budget)   # the tables ignored
            bound = codebook_bound(B, C, G, p.codebook_bits, p.budget, lam)
            assert bound <= ref * (1 + 1e-9) + 1e-12, (bound, ref, lam)
            assert bound >= plain - 1e-9 * abs(plain)
            checked += 1
            tighter += bound > plain * (1 + 1e-6) + 1e-12
        dp = solve_dp(p)
        assert dp.stats["lower_bound"] <= ref * (1 + 1e-9) + 1e-12
    assert checked >= 300 and tighter >= checked // 5   # charging the tables often raises the bound


def test_fewest_bits_counts_the_tables_it_saves():
    """A larger option on a grid already paid for can store less in all: the range's low end and the DP's
    fallback use the true fewest-bits assignment (brute force over every assignment)."""
    rng = np.random.default_rng(23)
    beaten = 0
    for _ in range(150):
        p = random_problem(rng, int(rng.integers(2, 6)), int(rng.integers(2, 5)), codebooks=True)
        fewest = brute_force_fewest_bits(p)
        lo, hi = p.bit_range()
        assert lo == fewest and p.evaluate(p.fewest_bits())[1] == fewest
        beaten += p.evaluate(p.extreme(False))[1] > fewest
        p.budget = fewest
        assert solve_dp(p).bits == fewest and solve_ilp(p).bits == fewest
    assert beaten >= 5   # each item's fewest-bits option is often not the fewest bits in all


def test_fewest_bits_local_search_never_does_worse_than_the_items_fewest(monkeypatch):
    import bitplan.solve.mckp as mckp

    monkeypatch.setattr(mckp, "_EXACT_GRIDS", 0)   # as with more grids than are tried exhaustively
    rng = np.random.default_rng(23)
    found = beaten = 0
    for _ in range(150):
        p = random_problem(rng, int(rng.integers(2, 6)), int(rng.integers(2, 5)), codebooks=True)
        fewest = brute_force_fewest_bits(p)
        naive = p.evaluate(p.extreme(False))[1]
        got = p.evaluate(p.fewest_bits())[1]
        assert fewest <= got <= naive
        found += got == fewest
        beaten += got < naive
    assert beaten >= 5 and found >= 0.9 * 150


def test_second_resource_is_respected_by_the_ilp_and_refused_by_the_dp():
    rng = np.random.default_rng(9)
    for _ in range(40):
        p = random_problem(rng, int(rng.integers(2, 6)), int(rng.integers(2, 5)), resource=True,
                           slack=rng.uniform(0.2, 1.0))
        ref = brute_force(p)
        if ref is None:
            with pytest.raises(BitplanError):
                solve_ilp(p)
            continue
        sol = solve_ilp(p)
        assert sol.bits <= p.budget and p.resource_used(sol.choice) <= p.resource_limit * (1 + 1e-9)
        assert _rel(sol.cost, ref) <= 1e-9
    with pytest.raises(BitplanError, match="ilp"):
        solve_dp(p)


def test_problem_rejects_malformed_items():
    with pytest.raises(BitplanError):
        Problem([np.array([1, 2])], [np.array([1.0])], 10)
    with pytest.raises(BitplanError):
        Problem([np.array([1])], [np.array([np.nan])], 10)
    with pytest.raises(BitplanError):
        Problem([], [], 10)


def test_ilp_regression_cbc_preprocessing_on_equal_items():
    """Two tied-block items with the same bits: CBC's preprocessing once returned the worse pairing as optimal."""
    bits = [np.array([50688, 65024, 122368, 229376])] * 2
    cost = [np.array([6.07780036e-03, 1.50453343e-03, 6.20852875e-06, 6.51570098e-11]),
            np.array([3.81238589e-03, 9.76335992e-04, 3.69127310e-06, 4.00973261e-11])]
    p = Problem(bits, cost, 117555)
    ref = brute_force(p)
    assert abs(solve_ilp(p).cost - ref) <= 1e-12 and abs(solve_dp(p).cost - ref) <= 1e-12
