"""The profile's printed summary: it ranks and shows the layers by the coefficient `solve` spends the bits by."""
from __future__ import annotations

import numpy as np

from bitplan.profile.report import sensitivity_table, solver_coefficient, summary_line
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
