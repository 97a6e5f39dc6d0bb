"""The profile shipped for the default model solves at once (issue acceptance: 3.25bpw lands in [3.24, 3.25])."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bitplan.profile.schema import load_profile
from bitplan.solve import load_plan, solve

SHIPPED = Path(__file__).resolve().parents[2] / "profiles" / "smollm2-135m"


def test_shipped_profile_is_complete():
    profile = load_profile(SHIPPED)
    assert len(profile.layers) == 210 and profile.model["id"] == "smollm2-135m"
    assert len(profile.formats) > 10 and "fp16" in profile.formats
    for layer in profile.layers:
        assert layer.alpha_hessian is not None and layer.alpha_hessian > 0
        assert set(profile.formats) <= set(layer.rel_err)


@pytest.mark.parametrize("budget", ["3.25bpw", "4bpw", "2.5bpw"])
def test_budget_lands_just_under(budget):
    plan = solve(SHIPPED, budget)
    target = float(budget.removesuffix("bpw"))
    assert target - 0.01 <= plan.totals["storage_bpw"] <= target


def test_cli_writes_the_plan(tmp_path):
    out = tmp_path / "plan.json"
    r = subprocess.run([sys.executable, "-c", "from bitplan.cli import main; main()", "solve", str(SHIPPED),
                        "--budget", "3.25bpw", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    plan = load_plan(out)
    assert 3.24 <= plan.totals["storage_bpw"] <= 3.25
