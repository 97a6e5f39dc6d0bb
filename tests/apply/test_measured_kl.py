"""measured_kl.json: the objective × rounding table apply quotes, as package data that says what it measured."""
from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import pytest

from bitplan.apply.run import measured_kl, rounding_mismatch
from bitplan.profile.schema import OBJECTIVES

ROUNDINGS = ("yaqa", "ldlq", "rtn")


def raw() -> dict:
    return json.loads(resources.files("bitplan.apply").joinpath("measured_kl.json").read_text(encoding="utf-8"))


def test_the_table_loads_and_says_what_it_measured():
    m = measured_kl()
    assert m.model == "smollm2-135m" and m.budget == "3.25bpw" and m.date == "2026-12-03"
    assert m.command.startswith("python experiments/objective_check.py --profile PROF --budget 3.25bpw")
    assert Path(__file__).parents[2].joinpath(m.command.split()[1]).is_file()   # the script that re-makes it
    assert "WikiText" in m.evaluation
    for objective, row in raw()["table"].items():
        assert objective in OBJECTIVES and set(row) == set(ROUNDINGS)
        for rounding, (kl, se) in row.items():
            assert m.kl(objective, rounding) == kl and 0 < se < kl


def test_rounding_mismatch_names_the_best_objective_of_each_rounding_in_the_table():
    table = raw()["table"]
    for rounding in ROUNDINGS:
        best = min(table, key=lambda o: table[o][rounding][0])   # brute force over the file itself
        for objective in [*table, "noise"]:
            ours = table["hessian" if objective == "noise" else objective][rounding][0]
            warning = rounding_mismatch(objective, rounding)
            if ours >= 1.1 * table[best][rounding][0]:
                assert warning.endswith(f"solve with --objective {best}")
                assert f"{ours:.3f} against {table[best][rounding][0]:.3f}" in warning
            else:
                assert warning is None
    assert rounding_mismatch("yaqa", "nearest") is None and rounding_mismatch("unmeasured", "rtn") is None


def test_the_results_page_shows_the_same_table():
    page = Path(__file__).parents[2] / "docs" / "results.md"
    if not page.is_file():
        pytest.skip("no docs/results.md")
    text = page.read_text(encoding="utf-8")
    section = text[text.index("## Which objective for which rounding"):]
    for objective, row in raw()["table"].items():
        line = re.search(rf"^\| `{re.escape(objective)}`[^|]*\|(.*)$", section, re.M)
        assert line, objective
        cells = re.findall(r"([\d.]+) ± ([\d.]+)", line.group(1))
        assert [(float(a), float(b)) for a, b in cells] == [tuple(row[r]) for r in ROUNDINGS]
