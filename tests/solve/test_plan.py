"""Storage accounting, the uniform baseline, infeasible budgets, and plan.json round trips and re-checks."""
from __future__ import annotations

import hashlib
import json
import math

import pytest

from bitplan.errors import BitplanError
from bitplan.formats import default_candidates, get_format
from bitplan.solve import load_plan, solve
from bitplan.solve.synthetic import SMOLLM2_135M, synthetic_profile

from .helpers import codebook_grid, storage_and_cost

SMOLLM2_WEIGHTS = 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576)


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """A SmolLM2-135M-shaped profile (30 blocks, real shapes) over the default candidates, saved to disk."""
    path = tmp_path_factory.mktemp("smollm2") / "profile.json"
    synthetic_profile(seed=0).save(path)
    return path.parent


@pytest.fixture(scope="module")
def smollm2_plan(smollm2_dir):
    return solve(smollm2_dir, "3.25bpw")


def test_smollm2_shaped_plan_lands_in_the_acceptance_window(smollm2_plan, smollm2_dir):
    from bitplan.profile.schema import load_profile

    plan = smollm2_plan
    t = plan.totals
    assert t["block_weights"] == SMOLLM2_WEIGHTS
    assert 3.24 <= t["storage_bpw"] <= 3.25
    # the totals, recomputed from scratch: every layer's exact storage plus each grid's table once
    bits, cost = storage_and_cost(load_profile(smollm2_dir), plan.formats, plan.objective)
    assert bits == t["layer_bits"] + t["codebook_bits"]
    assert abs(t["storage_bpw"] - bits / SMOLLM2_WEIGHTS) < 1e-15
    assert abs(t["predicted_dkl"] - cost) <= 1e-12 * cost
    grids = {codebook_grid(f) for f in plan.formats.values()} - {None}
    assert len(plan.codebooks) == len(grids)
    nominal = sum(get_format(lp.format).nominal_bits * lp.params for lp in plan.layers) / SMOLLM2_WEIGHTS
    assert abs(t["nominal_bpw"] - nominal) < 1e-12 and t["nominal_bpw"] < t["storage_bpw"]
    # embedding fp16, tied head free, norms fp16
    vocab, hidden = SMOLLM2_135M["vocab"], SMOLLM2_135M["hidden"]
    assert t["extras_bits"] == 16 * (vocab * hidden + (2 * 30 + 1) * hidden)
    assert t["total_bytes"] == math.ceil((bits + t["extras_bits"]) / 8)


def test_best_uniform_is_the_cheapest_single_format_that_fits(smollm2_plan, smollm2_dir):
    from bitplan.profile.schema import load_profile

    prof = load_profile(smollm2_dir)
    budget = math.floor(3.25 * SMOLLM2_WEIGHTS)
    best = None
    for f in default_candidates():
        bits, cost = storage_and_cost(prof, {r.name: f.name for r in prof.layers}, "yaqa")
        if bits <= budget and (best is None or cost < best[1]):
            best = (f.name, cost, bits)
    u = smollm2_plan.uniform
    assert (u["format"], u["storage_bpw"]) == (best[0], best[2] / SMOLLM2_WEIGHTS)
    assert abs(u["predicted_dkl"] - best[1]) <= 1e-12 * best[1]
    assert smollm2_plan.totals["predicted_dkl"] < u["predicted_dkl"]


def test_byte_budgets_count_the_whole_file(smollm2_dir):
    for budget, limit in (("90MB", 90 * 10**6), ("0.09GiB", 0.09 * 2**30), ("85MiB", 85 * 2**20)):
        plan = solve(smollm2_dir, budget)
        reserve = plan.budget["container_reserve_bits"]   # the file header and fp32 vectors, bounded
        assert 0 < reserve <= 0.005 * 8 * limit
        assert plan.totals["total_bytes"] <= limit - reserve / 8
        assert plan.totals["total_bytes"] >= limit - 0.001 * limit - reserve / 8  # the budget is used, not wasted
        assert plan.budget["kind"] == "bytes" and plan.budget["layer_bits"] == \
            math.floor(limit * 8) - plan.totals["extras_bits"] - reserve
    assert "fp16" in plan.extras["treatment"]


def test_an_untied_head_costs_its_fp16_bytes(tmp_path):
    tied = synthetic_profile(blocks=2, seed=3, tied_head=True)
    untied = synthetic_profile(blocks=2, seed=3, tied_head=False)
    a, b = solve(tied, "4bpw"), solve(untied, "4bpw")
    assert b.totals["extras_bits"] - a.totals["extras_bits"] == 16 * SMOLLM2_135M["vocab"] * SMOLLM2_135M["hidden"]


def test_infeasible_budgets_state_the_achievable_range(smollm2_dir):
    from bitplan.profile.schema import load_profile

    prof = load_profile(smollm2_dir)
    # the fewest-bits assignment of the default candidates, and the most: computed from the formats directly
    lo_f = {r.name: min(default_candidates(), key=lambda f: (f.storage_bits(*r.shape), r.alpha("yaqa") *
                        r.rel_err.get(f.name, f.mse_q))).name for r in prof.layers}
    hi_f = {r.name: "fp16" for r in prof.layers}
    lo = storage_and_cost(prof, lo_f, "yaqa")[0]
    hi = storage_and_cost(prof, hi_f, "yaqa")[0]
    with pytest.raises(BitplanError) as e:
        solve(smollm2_dir, "1.5bpw")
    assert f"{lo / SMOLLM2_WEIGHTS:.4f}–{hi / SMOLLM2_WEIGHTS:.4f} bpw" in str(e.value)
    with pytest.raises(BitplanError, match="achievable 2.1"):
        solve(smollm2_dir, "2.05bpw", min_bits=2)
    with pytest.raises(BitplanError, match="for the whole file") as e:
        solve(smollm2_dir, "60MB")
    assert "MB" in str(e.value)
    for bad in ("0bpw", "-2bpw", "0MB"):
        with pytest.raises(BitplanError, match="positive"):
            solve(smollm2_dir, bad)


def test_plan_records_its_profile_and_round_trips(smollm2_plan, smollm2_dir, tmp_path):
    plan = smollm2_plan
    file = smollm2_dir / "profile.json"
    assert plan.profile["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert plan.profile["path"] == str(file)
    out = tmp_path / "plan.json"
    plan.save(out)
    data = json.loads(out.read_text())
    assert (data["schema"], data["version"]) == ("bitplan.plan", 1)
    assert {"name", "format"} <= set(data["layers"][0])
    back = load_plan(out)
    assert back.formats == plan.formats
    assert back.totals == pytest.approx(plan.totals)
    assert back.uniform == plan.uniform and back.objective == plan.objective


def test_edited_plans_are_rechecked(smollm2_plan, smollm2_dir, tmp_path):
    from bitplan.profile.schema import load_profile

    out = tmp_path / "plan.json"
    smollm2_plan.save(out)
    data = json.loads(out.read_text())
    name = data["layers"][5]["name"]
    data["layers"][5]["format"] = "fp16"  # a hand edit: the recorded bits and ΔKL are now stale
    out.write_text(json.dumps(data))
    edited = load_plan(out)
    formats = dict(smollm2_plan.formats, **{name: "fp16"})
    bits, cost = storage_and_cost(load_profile(smollm2_dir), formats, "yaqa")
    assert edited.formats[name] == "fp16"
    assert edited.totals["layer_bits"] + edited.totals["codebook_bits"] == bits
    assert abs(edited.totals["predicted_dkl"] - cost) <= 1e-12 * cost
    assert edited.totals["within_budget"] is False  # 16 bits on one layer breaks a tight budget

    def broken(mutate, message):
        d = json.loads(out.read_text())
        mutate(d)
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(d))
        with pytest.raises(BitplanError, match=message):
            load_plan(bad)

    broken(lambda d: d["layers"][0].update(format="int9-g64"), f"{d_name(data, 0)}: unknown format")
    broken(lambda d: d["layers"].pop(3), "no format for layer")
    broken(lambda d: d["layers"].append(dict(d["layers"][0])), "appears twice")
    broken(lambda d: d["layers"][1].update(name="model.layers.99.mlp.up_proj"), "not in the profile")
    broken(lambda d: d["layers"][1].update(shape=[7, 7]), "profile says")
    broken(lambda d: d.update(schema="other"), "not a bitplan plan")
    broken(lambda d: d.update(version=2), "version")
    broken(lambda d: d.pop("layers"), "no \"layers\"")
    broken(lambda d: d["layers"][0].pop("format"), "needs string")
    (tmp_path / "torn.json").write_text('{"schema": "bitplan.plan", ')
    with pytest.raises(BitplanError, match="not valid JSON"):
        load_plan(tmp_path / "torn.json")


def d_name(data, i):
    return data["layers"][i]["name"]


def test_plans_without_their_profile_keep_what_they_can(smollm2_plan, tmp_path):
    out = tmp_path / "plan.json"
    smollm2_plan.save(out)
    data = json.loads(out.read_text())
    data["profile"]["path"] = str(tmp_path / "gone" / "profile.json")
    data["layers"][0]["format"] = "int8-g128"
    out.write_text(json.dumps(data))
    plan = load_plan(out)
    assert plan.layers[0].predicted_dkl is None  # edited, and nothing to recompute it from
    assert plan.layers[1].predicted_dkl == smollm2_plan.layers[1].predicted_dkl
    assert plan.layers[0].storage_bits == get_format("int8-g128").storage_bits(*plan.layers[0].shape)
    assert plan.totals["predicted_dkl"] is None


# Written out here, not imported: what each objective's α predicts ΔKL for.
EXPECTED_ROUNDING = {"yaqa": "yaqa", "yaqa-halves": "yaqa", "ldlq": "ldlq", "hessian": "rtn", "noise": "rtn"}


def test_every_objective_names_its_rounding():
    from bitplan.profile.schema import OBJECTIVES
    from bitplan.solve import rounding_for

    assert set(EXPECTED_ROUNDING) == set(OBJECTIVES)
    for objective, rounding in EXPECTED_ROUNDING.items():
        assert rounding_for(objective) == rounding


@pytest.mark.parametrize("objective", sorted(EXPECTED_ROUNDING))
def test_the_plan_records_the_rounding_it_was_solved_for(objective, tmp_path):
    from bitplan.solve.synthetic import synthetic_profile

    prof = synthetic_profile(blocks=2, seed=3)
    for r in prof.layers:  # what --objective ldlq needs: α_shaped and one-sided LDLQ's held-out gain
        r.extra.update(alpha_shaped=r.alpha_hessian, ldlq_gain_heldout=0.6)
    prof.save(tmp_path / "prof" / "profile.json")
    plan = solve(tmp_path / "prof", "4bpw", objective=objective)
    assert plan.rounding == EXPECTED_ROUNDING[objective]
    out = tmp_path / "plan.json"
    plan.save(out)
    assert json.loads(out.read_text())["rounding"] == EXPECTED_ROUNDING[objective]
    assert load_plan(out).rounding == EXPECTED_ROUNDING[objective]
    data = json.loads(out.read_text())
    del data["rounding"]  # a plan written before the field: its objective decides
    out.write_text(json.dumps(data))
    assert load_plan(out).rounding == EXPECTED_ROUNDING[objective]


def test_a_hand_set_rounding_is_kept_and_checked(smollm2_plan, tmp_path):
    out = tmp_path / "plan.json"
    smollm2_plan.save(out)
    data = json.loads(out.read_text())
    data["rounding"] = "rtn"  # a person decides to round a YAQA plan to nearest
    out.write_text(json.dumps(data))
    assert smollm2_plan.rounding == "yaqa" and load_plan(out).rounding == "rtn"
    data["rounding"] = "gptq"
    out.write_text(json.dumps(data))
    with pytest.raises(BitplanError, match="unknown rounding 'gptq'"):
        load_plan(out)


def test_plan_json_is_one_line_a_layer_and_reads_back_identically(smollm2_plan, tmp_path):
    out = tmp_path / "plan.json"
    smollm2_plan.save(out)
    text = out.read_text()
    data = json.loads(text)
    assert data == json.loads(json.dumps(smollm2_plan.to_json()))  # the same values as plain json writes
    lines = text.splitlines()
    start = lines.index('  "layers": [')
    layer_lines = lines[start + 1:start + 1 + len(smollm2_plan.layers)]
    assert [json.loads(line.strip().rstrip(",")) for line in layer_lines] == data["layers"]
    assert len(lines) < len(smollm2_plan.layers) + 200
    back = load_plan(out)
    assert back.to_json() == smollm2_plan.to_json()
    back.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == text


def test_optimality_explains_the_flag_next_to_it(smollm2_dir, smollm2_plan):
    s = smollm2_plan.solver
    assert list(s)[list(s).index("optimal") + 1] == "optimality"
    cost = smollm2_plan.totals["predicted_dkl"]
    if s["optimal"]:
        assert s["optimality"]["proven_gap"] == 0.0 and "proven optimal" in s["optimality"]["meaning"]
    else:
        assert s["optimality"]["proven_gap"] == pytest.approx((cost - s["lower_bound"]) / cost, rel=1e-9)
        assert s["optimality"]["proven_gap"] == s["gap_to_lower_bound"]  # the older key stays for its readers
        assert "lower_bound" in s["optimality"]["meaning"]
    ilp = solve(smollm2_dir, "3.25bpw", formats="int", solver="ilp")
    assert ilp.solver["optimal"] and ilp.solver["optimality"]["proven_gap"] == 0.0


def test_plans_written_before_optimality_and_rounding_still_load(smollm2_plan, tmp_path):
    data = json.loads(json.dumps(smollm2_plan.to_json()))
    del data["rounding"], data["solver"]["optimality"]
    out = tmp_path / "old.json"
    out.write_text(json.dumps(data, indent=2))  # the old writer: indent 2, a line per value
    old = load_plan(out)
    assert old.formats == smollm2_plan.formats and old.rounding == "yaqa"
    assert old.solver == smollm2_plan.solver  # optimality derived from the recorded gap
