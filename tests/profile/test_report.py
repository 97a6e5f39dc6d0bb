"""The profile's printed summary: it ranks and shows the layers by the coefficient `solve` spends the bits by."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from bitplan.profile.report import (COLUMNS, REFERENCE_FORMATS, sensitivity_table, solver_coefficient, summary_line,
                                    write_csv)
from bitplan.profile.schema import LayerRecord, Profile


def synthetic_profile(n: int = 20, judge: bool = True, yaqa: bool = True, seed: int = 0) -> Profile:
    """Layers whose α_hessian, halves' and judged coefficients rank them in three unrelated orders."""
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(n):
        hess, shaped = rng.uniform(0.01, 1.0, size=2)
        rec = LayerRecord(name=f"model.layers.{i}.mlp.down_proj", block=i, kind="down_proj", shape=(8, 16),
                          weight_sq_norm=1.0, alpha_noise=hess * 0.9, alpha_noise_r2=0.99, alpha_hessian=hess,
                          extra={"alpha_shaped": shaped})
        if yaqa:
            rec.alpha_yaqa_heldout = shaped * rng.uniform(0.05, 0.9)
        if judge:
            rec.extra.update(alpha_shaped_judge=rng.uniform(0.01, 1.0), yaqa_gain_judged=rng.uniform(0.05, 0.9))
        layers.append(rec)
    return Profile(model={"id": "synthetic"}, calibration={"tokens": 1024}, formats=["int4-g128"], layers=layers)


def column(table, header: str) -> list[str]:
    col = next(c for c in table.columns if c.header == header)
    return list(col._cells)


def names_in_order(table) -> list[str]:
    return column(table, "layer")


def expected_order(profile: Profile, value, top: int) -> list[str]:
    ranked = sorted(profile.layers, key=lambda r: -value(r))
    return [r.name.replace("model.layers.", "").removesuffix("_proj") for r in ranked[:top] + ranked[-top:]]


def test_with_a_judge_the_table_ranks_and_shows_the_judged_coefficient():
    profile = synthetic_profile()
    assert solver_coefficient(profile) == "alpha_yaqa_judged"
    table = sensitivity_table(profile, top=4)
    assert names_in_order(table) == expected_order(profile, lambda r: r.alpha_yaqa_judged, 4)
    assert names_in_order(table) != expected_order(profile, lambda r: r.alpha_hessian, 4)
    by_name = {r.name.replace("model.layers.", "").removesuffix("_proj"): r for r in profile.layers}
    for name, coef, gain in zip(names_in_order(table), column(table, "α_yaqa_judged"), column(table, "gain")):
        r = by_name[name]
        assert float(coef) == float(format(r.extra["alpha_shaped_judge"] * r.extra["yaqa_gain_judged"], ".3g"))
        assert float(gain) == round(r.extra["yaqa_gain_judged"], 3)
    assert "judged on the model's own samples" in table.caption


def test_without_a_judge_the_table_shows_the_halves_coefficient_and_its_gain():
    profile = synthetic_profile(judge=False)
    assert solver_coefficient(profile) == "alpha_yaqa_heldout"
    table = sensitivity_table(profile, top=4)
    assert names_in_order(table) == expected_order(profile, lambda r: r.alpha_yaqa_heldout, 4)
    by_name = {r.name.replace("model.layers.", "").removesuffix("_proj"): r for r in profile.layers}
    for name, gain in zip(names_in_order(table), column(table, "gain")):
        r = by_name[name]
        assert float(gain) == round(r.alpha_yaqa_heldout / r.extra["alpha_shaped"], 3)
    assert "α_yaqa_judged" not in [c.header for c in table.columns]


def test_without_yaqa_coefficients_the_table_ranks_by_alpha_hessian():
    profile = synthetic_profile(judge=False, yaqa=False)
    assert solver_coefficient(profile) is None
    table = sensitivity_table(profile, top=4)
    assert names_in_order(table) == expected_order(profile, lambda r: r.alpha_hessian, 4)
    assert [c.header for c in table.columns] == ["layer", "α_hessian", "α_noise", "R²"]


def test_summary_names_the_solvers_coefficient_and_both_median_gains():
    profile = synthetic_profile(n=21)
    line = summary_line(profile)
    judged = float(np.median([r.extra["yaqa_gain_judged"] for r in profile.layers]))
    halves = float(np.median([r.alpha_yaqa_heldout / r.extra["alpha_shaped"] for r in profile.layers]))
    assert f"median YAQA gain {judged:.3f} judged on the model's own samples, {halves:.3f} held-out" in line
    assert "spends the bits by alpha_yaqa_judged" in line
    assert "spends the bits by" not in summary_line(synthetic_profile(judge=False, yaqa=False))


REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "profiles" / "smollm2-135m"


def documented_columns() -> list[str]:
    """The first column of docs/sensitivity-csv.md's table, in its order."""
    text = (REPO / "docs" / "sensitivity-csv.md").read_text(encoding="utf-8")
    return re.findall(r"^\| `([^`]+)` \|", text, flags=re.M)


def csv_header(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        return next(csv.reader(fh))


def check_documented_order(header: list[str]) -> None:
    documented = documented_columns()
    fixed = [c for c in documented if c != "dkl_<format>"]
    assert documented[-1] == "dkl_<format>" and header[:len(fixed)] == fixed
    assert all(c.startswith("dkl_") and c[4:] in REFERENCE_FORMATS for c in header[len(fixed):])


def test_the_csv_has_the_documented_columns_in_their_order(tmp_path):
    profile = synthetic_profile()
    profile.formats = ["int4-g128", "int3-g128", "higgs-p2-n16-g128"]
    for r in profile.layers:
        r.rel_err = {f: 0.01 for f in profile.formats}
    write_csv(profile, tmp_path / "sensitivity.csv")
    header = csv_header(tmp_path / "sensitivity.csv")
    check_documented_order(header)
    assert header[-3:] == ["dkl_int4-g128", "dkl_int3-g128", "dkl_higgs-p2-n16-g128"]
    assert documented_columns()[:12] == ["name", "block", "kind", "out_features", "in_features", "params",
                                         "alpha_solver", "alpha_solver_name", "alpha_solver_gain", "alpha_noise",
                                         "alpha_noise_r2", "alpha_hessian"]   # what a reviewer acts on, first


def test_the_shipped_csv_is_its_profiles_own(tmp_path):
    """The shipped sensitivity.csv is what the project's writer makes from the shipped profile.json."""
    from bitplan.profile.schema import load_profile

    write_csv(load_profile(SHIPPED), tmp_path / "sensitivity.csv")
    assert (tmp_path / "sensitivity.csv").read_text() == (SHIPPED / "sensitivity.csv").read_text()
    check_documented_order(csv_header(SHIPPED / "sensitivity.csv"))


def test_one_trace_column_because_the_two_traces_are_one():
    """tr H_I = Σ_c tr G_cᵀG_c = Σ_c tr G_c G_cᵀ = tr H_O: the shipped profile's stored traces differ only by the
    float32 rounding of the factors (≤ 1e-6 relative), so the CSV keeps one."""
    g = np.random.default_rng(0).standard_normal((5, 7, 3))
    assert np.einsum("cij,cij->", g, g) == pytest.approx(sum(np.trace(x.T @ x) for x in g), rel=1e-12)
    assert np.einsum("cij,cij->", g, g) == pytest.approx(sum(np.trace(x @ x.T) for x in g), rel=1e-12)
    layers = json.loads((SHIPPED / "profile.json").read_text())["layers"]
    assert len(layers) == 210
    assert max(abs(r["trace_h_in"] / r["trace_h_out"] - 1) for r in layers) < 1e-6
    assert "trace_h_in" not in COLUMNS and "trace_h_out" not in COLUMNS and "trace_h" in COLUMNS


@pytest.mark.parametrize("judge, yaqa", [(True, True), (False, True), (False, False)])
def test_alpha_solver_is_what_solve_spends_the_bits_by(tmp_path, judge, yaqa):
    from bitplan.formats import get_format
    from bitplan.solve import solve
    from bitplan.solve.synthetic import synthetic_profile as solver_profile

    formats = ["int2-g64", "int3-g64", "int4-g64", "int8-g64", "fp16"]
    objectives = ("alpha_noise", "alpha_hessian") + (("alpha_yaqa_heldout",) if yaqa else ())
    profile = solver_profile(blocks=2, shapes={"q_proj": (64, 64), "gate_proj": (96, 64)}, seed=7, vocab=100,
                             hidden=64, formats=[get_format(f) for f in formats], objectives=objectives)
    rng = np.random.default_rng(1)
    for r in profile.layers:
        r.extra["alpha_shaped"] = r.alpha_hessian * 0.8
        if judge:
            r.extra.update(alpha_shaped_judge=r.alpha_hessian * rng.uniform(0.5, 1.5),
                           yaqa_gain_judged=rng.uniform(0.1, 0.9))
    if judge:
        profile.layers[1].extra["yaqa_gain_judged"] = -0.05   # a slightly negative fit: solve counts it as 0
    profile.save(tmp_path / "prof" / "profile.json")
    plan = solve(tmp_path / "prof", "4bpw")
    write_csv(profile, tmp_path / "sensitivity.csv")
    rows = list(csv.DictReader(open(tmp_path / "sensitivity.csv", newline="")))
    assert plan.objective == ("yaqa" if yaqa else "hessian")
    for row, r, lp in zip(rows, profile.layers, plan.layers):
        assert row["name"] == r.name == lp.name
        assert row["alpha_solver_name"] == r.coefficient(plan.objective) == plan.coefficient
        alpha = float(row["alpha_solver"])
        assert alpha == pytest.approx(r.alpha(plan.objective), rel=1e-5)
        t2 = r.rel_err.get(lp.format, get_format(lp.format).mse_q)
        assert lp.predicted_dkl == pytest.approx(alpha * t2, rel=1e-5, abs=1e-300)   # solve's cost: α × t²
        gain = row["alpha_solver_gain"]
        if plan.objective == "hessian":
            assert gain == ""
        elif judge:
            assert float(gain) == pytest.approx(r.extra["yaqa_gain_judged"], rel=1e-5)
        else:
            assert float(gain) == pytest.approx(r.alpha_yaqa_heldout / r.extra["alpha_shaped"], rel=1e-5)
    if judge:
        assert float(rows[1]["alpha_solver"]) == 0.0 and float(rows[1]["alpha_yaqa_judged"]) < 0
