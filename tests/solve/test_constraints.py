"""Pins, tie groups, bit bounds and a second resource, checked against brute force over the allowed assignments."""
from __future__ import annotations

import copy
import itertools
import json
import re

import numpy as np

import pytest

from bitplan.errors import BitplanError
from bitplan.formats import get_format
from bitplan.solve import solve

from .conftest import GRID_FORMATS, INT_FORMATS
from .helpers import profile_brute_force


def _bpw_budget(profile, frac: float) -> str:
    """A bpw budget a fraction of the way between 2 and 8 bits (within reach of the int formats)."""
    return f"{2.6 + frac * 5:.4f}bpw"


def _budget_bits(profile, budget: str) -> int:
    from bitplan.solve.budget import parse_budget

    return parse_budget(budget).bits(sum(r.params for r in profile.layers))


def _groups(profile, kinds_sets):
    groups = []
    for block in sorted({r.block for r in profile.layers}):
        for kinds in kinds_sets:
            members = [r.name for r in profile.layers if r.block == block and
                       (kinds is None or r.kind.removesuffix("_proj") in kinds)]
            if len(members) > 1:
                groups.append(members)
    return groups


CASES = [
    # tie spec, tie groups as kinds, pins, min bits, max bits
    ("qkv", [("q", "k", "v")], [r"layers\.1\.self_attn\.k_proj=int8-g64"], None, None),
    ("block", [None], [], 3, None),
    (None, [], [r"gate_proj=int2-g64"], None, 4),
    ("qkv,gateup", [("q", "k", "v")], [r"layers\.0\.self_attn\.q_proj=int4-g64"], 2, 8),
]


@pytest.mark.parametrize("tie, kinds, pins, lo, hi", CASES)
@pytest.mark.parametrize("frac", [0.05, 0.3, 0.7])
def test_dp_and_ilp_match_brute_force_under_constraints(small_profile, tie, kinds, pins, lo, hi, frac):
    prof = small_profile
    budget = _bpw_budget(prof, frac)
    pinned = {}
    for pin in pins:
        regex, fmt = pin.rsplit("=", 1)
        pinned.update({r.name: fmt for r in prof.layers if re.search(regex, r.name)})
    allowed = [f for f in INT_FORMATS if (lo is None or get_format(f).nominal_bits >= lo)
               and (hi is None or get_format(f).nominal_bits <= hi)]
    options = {r.name: [pinned[r.name]] if r.name in pinned else allowed for r in prof.layers}
    groups = _groups(prof, kinds)
    ref = profile_brute_force(prof, options, groups, _budget_bits(prof, budget), "yaqa")
    for solver in ("dp", "ilp"):
        if ref is None:
            with pytest.raises(BitplanError, match="achievable"):
                solve(prof, budget, solver=solver, pins=pins, min_bits=lo, max_bits=hi, tie=tie)
            continue
        plan = solve(prof, budget, solver=solver, pins=pins, min_bits=lo, max_bits=hi, tie=tie)
        got = plan.formats
        assert abs(plan.totals["predicted_dkl"] - ref[0]) <= 1e-9 * ref[0], solver
        for name, fmt in pinned.items():
            assert got[name] == fmt
        for g in groups:
            assert len({got[n] for n in g}) == 1, (solver, g, [got[n] for n in g])
        for fmt in got.values():
            nb = get_format(fmt).nominal_bits
            assert (lo is None or nb >= lo) and (hi is None or nb <= hi)
        assert plan.totals["layer_bits"] + plan.totals["codebook_bits"] <= _budget_bits(prof, budget)


def test_ilp_is_exact_with_codebooks_and_the_dp_close(grid_profile):
    prof = grid_profile
    for frac in (0.0, 0.1, 0.25):
        budget = f"{2.4 + frac * 4:.3f}bpw"
        ref = profile_brute_force(prof, {r.name: GRID_FORMATS for r in prof.layers}, _groups(prof, [("q", "k", "v")]),
                                  _budget_bits(prof, budget), "yaqa")
        ilp = solve(prof, budget, solver="ilp", tie="qkv")
        dp = solve(prof, budget, solver="dp", tie="qkv")
        assert abs(ilp.totals["predicted_dkl"] - ref[0]) <= 1e-9 * ref[0]
        assert ref[0] * (1 - 1e-9) <= dp.totals["predicted_dkl"] <= ref[0] * 1.01
        for plan in (ilp, dp):
            assert plan.totals["layer_bits"] + plan.totals["codebook_bits"] <= _budget_bits(prof, budget)


def test_a_pin_equal_to_the_solvers_choice_is_still_honoured(small_profile):
    free = solve(small_profile, "3.5bpw")
    name = small_profile.layers[3].name
    fmt = free.formats[name]
    pin = f"^{re.escape(name)}$={fmt}"
    same = solve(small_profile, "3.5bpw", pins=[pin])
    assert same.formats == free.formats  # pinning the optimum's own choice changes nothing
    assert same.constraints["pins"] == [[f"^{re.escape(name)}$", fmt]]
    rich = solve(small_profile, "7.5bpw", pins=[pin])  # with more bits the solver would move it
    assert solve(small_profile, "7.5bpw").formats[name] != fmt
    assert rich.formats[name] == fmt


def test_resource_table_ilp_matches_brute_force_and_dp_refuses(small_profile, tmp_path):
    per_weight = {"int2-g64": 1.0, "int3-g64": 1.4, "int4-g64": 1.1, "int8-g64": 3.0, "fp16": 5.0}
    prof = small_profile
    budget = "5bpw"
    # A limit halfway between the cheapest resource use and the unconstrained optimum's, so it binds.
    free = solve(prof, budget, solver="ilp")
    used = sum(per_weight[free.formats[r.name]] * r.params for r in prof.layers) / sum(r.params for r in prof.layers)
    assert used > 1.0, "the unconstrained plan should use more than the cheapest resource"
    limit = (1.0 + used) / 2
    table = tmp_path / "latency.json"
    table.write_text(json.dumps({"name": "latency", "per_weight": per_weight, "limit_per_weight": limit}))
    csv_table = tmp_path / "latency.csv"
    csv_table.write_text("format,per_weight\n" + "".join(f"{k},{v}\n" for k, v in per_weight.items()))
    fmts = [get_format(f) for f in INT_FORMATS]
    bits = np.array([[f.storage_bits(*r.shape) for f in fmts] for r in prof.layers])
    res = np.array([[per_weight[f.name] * r.params for f in fmts] for r in prof.layers])
    cost = np.array([[r.alpha("yaqa") * r.rel_err.get(f.name, f.mse_q) for f in fmts] for r in prof.layers])
    combos = np.array(list(itertools.product(range(len(fmts)), repeat=len(prof.layers))))
    rows = np.arange(len(prof.layers))
    ok = (bits[rows, combos].sum(1) <= _budget_bits(prof, budget)) & \
         (res[rows, combos].sum(1) <= limit * sum(r.params for r in prof.layers))
    best = float(cost[rows, combos].sum(1)[ok].min())
    for source, lim in ((table, None), (csv_table, limit)):
        plan = solve(prof, budget, solver="ilp", resource=source, resource_limit=lim)
        assert abs(plan.totals["predicted_dkl"] - best) <= 1e-9 * best
        assert plan.solver["resource_used_per_weight"] <= limit + 1e-12
    assert free.totals["predicted_dkl"] < best * (1 - 1e-6)  # the limit binds
    with pytest.raises(BitplanError, match="ilp"):
        solve(prof, budget, solver="dp", resource=table)
    with pytest.raises(BitplanError, match="limit"):
        solve(prof, budget, solver="ilp", resource=csv_table)
    with pytest.raises(BitplanError, match="no assignment"):
        solve(prof, budget, solver="ilp", resource=table, resource_limit=0.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(tie="qkv", pins=[r"layers\.0\.self_attn\.q_proj=int4-g64", r"layers\.0\.self_attn\.v_proj=int8-g64"]),
     "contradict the tie group"),
    (dict(pins=["gate_proj=int8-g64"], max_bits=4), "outside --min-bits/--max-bits"),
    (dict(pins=["gate_proj=int2-g64"], min_bits=3), "outside --min-bits/--max-bits"),
    (dict(pins=["no_such_layer=int4-g64"]), "matches no layer"),
    (dict(pins=["q_proj=int4-g64", "layers.0.self_attn.q=int8-g64"]), "pinned twice"),
    (dict(pins=["q_proj=int9-g64"]), "unknown format"),
    (dict(pins=["q_proj"]), "REGEX=FORMAT"),
    (dict(pins=["(q_proj=int4-g64"]), "invalid regular expression"),
    (dict(formats="int4-g64,higgs-p9-n3-g64"), "unknown format"),
    (dict(tie="qkvo"), "unknown tie group"),
    (dict(min_bits=5, max_bits=4), "above --max-bits"),
    (dict(min_bits=9, max_bits=12), "no candidate format"),
    (dict(objective="bogus"), "unknown objective"),
    (dict(solver="greedy"), "unknown solver"),
])
def test_constraint_errors(small_profile, kwargs, message):
    with pytest.raises(BitplanError, match=message):
        solve(small_profile, "4bpw", **kwargs)


def test_objective_default_and_missing_coefficient(small_profile):
    assert solve(small_profile, "4bpw").objective == "yaqa"
    for r in small_profile.layers:
        r.alpha_yaqa = r.alpha_yaqa_heldout = None
    assert solve(small_profile, "4bpw").objective == "hessian"  # falls back to what every layer has
    with pytest.raises(BitplanError, match="alpha_yaqa"):
        solve(small_profile, "4bpw", objective="yaqa")
    small_profile.layers[0].alpha_hessian = None
    assert solve(small_profile, "4bpw").objective == "noise"


def with_judge(profile, seed=3):
    """Every layer gets a judge whose coefficient orders the layers unlike the halves' (independent draws)."""
    rng = np.random.default_rng(seed)
    for r in profile.layers:
        r.extra.update(alpha_shaped_judge=float(rng.lognormal(-2.0, 1.0)), yaqa_gain_judged=float(rng.uniform(0.1, 1.2)))
    return profile


def test_yaqa_takes_the_judges_coefficient_when_every_layer_has_one(small_profile):
    plan = solve(with_judge(small_profile), "4bpw")
    assert plan.objective == "yaqa" and plan.coefficient == "alpha_yaqa_judged"
    # each layer's cost is the judge's α_shaped × gain × the chosen format's measured t², computed here
    for lp, r in zip(plan.layers, small_profile.layers):
        want = r.extra["alpha_shaped_judge"] * r.extra["yaqa_gain_judged"] * r.rel_err[lp.format]
        assert lp.predicted_dkl == pytest.approx(want, rel=1e-12)
    # the same plan as a profile whose halves' coefficient is the judged one; yaqa-halves ignores the judge
    swapped = copy.deepcopy(small_profile)
    for r in swapped.layers:
        r.alpha_yaqa_heldout, r.extra = r.extra["alpha_shaped_judge"] * r.extra["yaqa_gain_judged"], {}
    assert solve(swapped, "4bpw").formats == plan.formats
    halves = solve(small_profile, "4bpw", objective="yaqa-halves")
    plain = copy.deepcopy(small_profile)
    for r in plain.layers:
        r.extra = {}
    assert halves.coefficient == "alpha_yaqa_heldout" and halves.formats == solve(plain, "4bpw").formats
    assert halves.formats != plan.formats   # the two coefficients order the layers differently, and so the plans


def test_ldlq_takes_one_sided_ldlqs_gain_judged_or_cross_fitted_and_is_never_the_default(small_profile):
    rng = np.random.default_rng(4)
    with pytest.raises(BitplanError, match="alpha_ldlq_judged or alpha_ldlq_heldout"):
        solve(small_profile, "4bpw", objective="ldlq")   # the fixture has no LDLQ gains
    plans = {}
    # the halves' figures first; a judge then takes precedence
    for coefficient, alpha, gain in (("alpha_ldlq_heldout", "alpha_shaped", "ldlq_gain_heldout"),
                                     ("alpha_ldlq_judged", "alpha_shaped_judge", "ldlq_gain_judged")):
        for r in small_profile.layers:
            r.extra.update({alpha: float(rng.lognormal(-2.0, 1.0)), gain: float(rng.uniform(0.1, 0.9))})
        plans[coefficient] = plan = solve(small_profile, "4bpw", objective="ldlq")
        assert plan.coefficient == coefficient
        for lp, r in zip(plan.layers, small_profile.layers):
            assert lp.predicted_dkl == pytest.approx(r.extra[alpha] * r.extra[gain] * r.rel_err[lp.format], rel=1e-12)
    assert plans["alpha_ldlq_judged"].formats != plans["alpha_ldlq_heldout"].formats
    assert solve(small_profile, "4bpw").objective == "yaqa"   # LDLQ's coefficient is asked for, never defaulted


def test_a_plan_keeps_its_coefficient_through_a_reload(small_profile, tmp_path):
    from bitplan.solve import load_plan

    plan = solve(with_judge(small_profile), "4bpw")
    plan.save(tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json").coefficient == "alpha_yaqa_judged"           # as recorded
    for r in small_profile.layers:
        r.extra = {}
    assert load_plan(tmp_path / "plan.json", small_profile).coefficient == "alpha_yaqa_heldout"  # re-checked


def test_named_format_sets(small_profile):
    from bitplan.formats import default_candidates
    from bitplan.solve.problem import resolve_formats

    assert [f.name for f in resolve_formats(None, small_profile)] == INT_FORMATS
    assert [f.name for f in resolve_formats("default", small_profile)] == [f.name for f in default_candidates()]
    kernel = resolve_formats("kernel", small_profile)
    assert all(f.kind in ("int", "fp16") or f.vector_dim <= 2 for f in kernel)
    assert any(f.kind == "grid" for f in kernel) and "fp16" in [f.name for f in kernel]
    assert all(f.kind in ("grid", "fp16") for f in resolve_formats("grid", small_profile))
    assert [f.name for f in resolve_formats("int3-g64, fp16", small_profile)] == ["int3-g64", "fp16"]
