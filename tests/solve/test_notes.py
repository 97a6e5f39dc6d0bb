"""solve's notes: a budget the formats cannot use, and formats priced by the Gaussian estimate instead of a
measurement, are said on stderr (the plan alone would not show either)."""
from __future__ import annotations

from bitplan.solve import solve

from tests.solve.conftest import GRID_FORMATS


def test_a_budget_beyond_the_largest_formats_is_noted(small_profile, capsys):
    plan = solve(small_profile, "100bpw")
    assert all(layer.format == "fp16" for layer in plan.layers)
    err = capsys.readouterr().err
    assert "note: budget 100bpw is more than these formats can use" in " ".join(err.split())


def test_a_budget_within_reach_has_no_note(small_profile, capsys):
    solve(small_profile, "4bpw")
    assert "note" not in capsys.readouterr().err


def test_unmeasured_formats_are_named(grid_profile, small_profile, capsys):
    # reference: the non-fp16 formats some layer of the profile has no measured t² for
    unmeasured = sorted({f for f in GRID_FORMATS if f != "fp16"
                         for r in grid_profile.layers if f not in r.rel_err})
    assert unmeasured   # the fixture measures 70 % of the pairs
    solve(grid_profile, "4bpw", formats=",".join(GRID_FORMATS))
    err = " ".join(capsys.readouterr().err.split())
    assert f"{len(unmeasured)} candidate format(s) were not measured" in err
    for name in unmeasured[:4]:
        assert name in err
    solve(small_profile, "4bpw")   # every pair measured
    assert "not measured" not in capsys.readouterr().err
