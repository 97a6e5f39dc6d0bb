"""`bitplan solve` on the command line: outputs, and bad input ending in one line and exit code 2."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bitplan.solve import load_plan, solve
from bitplan.solve.synthetic import synthetic_profile

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def profile_dir(tmp_path):
    from bitplan.formats import get_format

    from .conftest import INT_FORMATS, SMALL_SHAPES

    prof = synthetic_profile(blocks=3, shapes=SMALL_SHAPES, formats=[get_format(f) for f in INT_FORMATS], seed=4,
                             vocab=100, hidden=64)
    prof.save(tmp_path / "prof" / "profile.json")
    return tmp_path / "prof"




def test_solve_writes_a_plan_and_explains_it(monkeypatch, capsys, profile_dir, tmp_path, cli):
    out = tmp_path / "plan.json"
    code, stdout, _ = cli("solve", profile_dir, "--budget", "4bpw", "-o", out)
    assert code == 0
    plan = json.loads(out.read_text())
    assert plan["totals"]["storage_bpw"] <= 4 and plan["objective"] == "yaqa"
    assert "objective yaqa: alpha_yaqa_heldout (the best coefficient this profile has)" in stdout
    assert plan["coefficient"] == "alpha_yaqa_heldout"   # the fixture has no judge
    for heading in ("formats by projection kind", "by depth", "largest predicted ΔKL", "best uniform"):
        assert heading in stdout
    code, stdout, err = cli("solve", profile_dir, "--budget", "6bpw", "-o", out, "--objective", "noise",
                          "--solver", "ilp", "--tie", "qkv", "--pin", "gate_proj=int8-g64", "--max-bits", "8")
    assert code == 0 and "objective noise: alpha_noise (as asked)" in stdout, err
    plan = json.loads(out.read_text())
    assert all(l["format"] == "int8-g64" for l in plan["layers"] if l["kind"] == "gate_proj")
    assert plan["constraints"]["tie"] == ["qkv"] and plan["solver"]["name"] == "ilp"


def test_sweep_writes_a_pareto_table_and_a_plot(monkeypatch, capsys, profile_dir, tmp_path, cli):
    out = tmp_path / "sweep" / "plan.json"
    code, stdout, _ = cli("solve", profile_dir, "--sweep", "2:5:0.5", "-o", out)
    assert code == 0 and not out.exists()  # no --budget: the sweep only
    rows = list(csv.DictReader(open(out.with_name("plan-sweep.csv"))))
    assert [float(r["budget_bpw"]) for r in rows] == [2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
    assert rows[0]["predicted_dkl"] == "" and "achievable" in rows[0]["note"]  # int2-g64 stores 2.5+ bpw
    feasible = [r for r in rows if r["predicted_dkl"]]
    assert len(feasible) >= 5
    for r in feasible:
        assert float(r["storage_bpw"]) <= float(r["budget_bpw"])
        if r["uniform_dkl"]:
            assert float(r["predicted_dkl"]) <= float(r["uniform_dkl"]) * (1 + 1e-12)
    dkl = [float(r["predicted_dkl"]) for r in feasible]
    assert dkl == sorted(dkl, reverse=True)  # more bits never predict more ΔKL
    assert out.with_name("plan-sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a plan per feasible budget beside the table, the same as solving at that budget alone
    assert sorted(p.name for p in out.parent.glob("plan-*bpw.json")) == sorted(r["plan_file"] for r in feasible)
    assert all(r["plan_file"] == "" for r in rows if not r["predicted_dkl"])
    flat = " ".join(stdout.split())   # the console wraps long lines (temporary paths) wherever they fall
    assert f"{len(feasible)} plans" in flat and feasible[-1]["plan_file"] in flat
    for r in feasible:
        assert r["plan_file"] == f"plan-{float(r['budget_bpw']):g}bpw.json"
        alone = solve(profile_dir, f"{float(r['budget_bpw']):g}bpw")
        saved = load_plan(out.with_name(r["plan_file"]))
        assert saved.formats == alone.formats and saved.budget["given"] == alone.budget["given"]
        assert saved.totals["predicted_dkl"] == pytest.approx(float(r["predicted_dkl"]), rel=1e-12)
    code, _, _ = cli("solve", profile_dir, "--sweep", "3:4:0.5", "--budget", "3.5bpw", "-o", out)
    assert code == 0 and out.exists()
    folder = tmp_path / "into"  # -o DIR/ (not there yet): the files go inside it
    code, _, _ = cli("solve", profile_dir, "--sweep", "3:4:0.5", "--budget", "3.5bpw", "-o", f"{folder}/")
    assert code == 0
    assert sorted(p.name for p in folder.iterdir()) == ["plan-3.5bpw.json", "plan-3bpw.json", "plan-4bpw.json",
                                                        "plan-sweep.csv", "plan-sweep.png", "plan.json"]


def _bad_profile(tmp_path, what):
    path = tmp_path / "bad" / "profile.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if what == "torn":
        path.write_text('{"schema": "bitplan.profile", "version": 1, "layers": [')
    else:
        from bitplan.formats import get_format

        from .conftest import SMALL_SHAPES

        prof = synthetic_profile(blocks=1, shapes=SMALL_SHAPES, formats=[get_format("int4-g64")],
                                 objectives=("alpha_noise",), vocab=100, hidden=64)
        prof.save(path)
    return path.parent


@pytest.mark.parametrize("args, message", [
    (["--budget", "0bpw"], "budget must be positive"),
    (["--budget=-2bpw"], "budget must be positive"),
    (["--budget", "0.5bpw"], "achievable"),
    (["--budget", "10kB"], "for the whole file"),
    (["--budget", "3bpw", "--formats", "int4-g64,int5-g65"], "unknown format 'int5-g65'"),
    (["--budget", "3bpw", "--tie", "qkv", "--pin", r"0\.self_attn\.q_proj=int4-g64", "--pin",
      r"0\.self_attn\.k_proj=int3-g64"], "contradict the tie group"),
    (["--budget", "3bpw", "--pin", "q_proj=int8-g64", "--max-bits", "4"], "outside --min-bits/--max-bits"),
    (["--budget", "3bpw", "--objective", "yaqa", "PROFILE=nocoef"], "alpha_yaqa"),
    (["--budget", "3bpw", "PROFILE=torn"], "not valid JSON"),
    (["--budget", "3bpw", "--resource", "missing.json", "--solver", "ilp"], "not found"),
    (["-o", "x.json"], "give a --budget (e.g. 3.25bpw or 2.1GB) or a --sweep A:B:STEP"),  # not A🅱STEP
])
def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, profile_dir, tmp_path, args, message, cli):
    prof = profile_dir
    args = list(args)
    for a in list(args):
        if a.startswith("PROFILE="):
            args.remove(a)
            prof = _bad_profile(tmp_path, a.split("=")[1])
    code, _, err = cli("solve", prof, *args, *([] if "-o" in args else ["-o", tmp_path / "p.json"]))
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_real_process_exits_2_without_a_traceback(tmp_path):
    prof = _bad_profile(tmp_path, "torn")
    code = ("from bitplan.cli import main; import sys; "
            "sys.argv=['bitplan','solve',sys.argv[1],'--budget','3bpw']; main()")
    proc = subprocess.run([sys.executable, "-c", code, str(prof)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def body_cells(text: str, title: str) -> list[list[str]]:
    """The body rows (stripped cells) of the rich table printed under `title`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if title in line)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("└"):
            break
        if line.startswith("│"):
            rows.append([c.strip() for c in line.split("│")[1:-1]])
    return rows


def test_layer_and_format_names_are_never_cut_at_80_columns(monkeypatch, capsys, tmp_path, cli):
    """The names users type back into --formats and --pin appear whole in every table at 80 columns."""
    from rich.console import Console

    import bitplan.cli.solve_cmd as solve_cmd
    from bitplan.formats import get_format
    from bitplan.solve import load_plan

    long = ["higgs-p2-n1024-g128", "higgs-p3-n2048-g128", "higgs-p4-n4096-g128", "higgs-p2-n256-g128", "fp16"]
    prof = synthetic_profile(blocks=4, formats=[get_format(f) for f in long], seed=5)
    prof.save(tmp_path / "prof" / "profile.json")
    narrow = Console(width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(solve_cmd, "console", narrow)
    out = tmp_path / "plan.json"
    code, _, err = cli("solve", tmp_path / "prof", "--budget", "3.3bpw", "--top", "28", "-o", out,
                       "--sweep", "3.5:4.5:0.25")
    assert code == 0, err
    text = narrow.export_text()
    plan = load_plan(out)
    top = body_cells(text, "largest predicted ΔKL")
    assert len(top) == len(plan.layers)
    assert {(row[0], row[1]) for row in top} == {(lp.name, lp.format) for lp in plan.layers}
    listed: dict[str, set] = {}
    kind = None
    for row in body_cells(text, "formats by projection kind"):
        kind = row[0] or kind
        if not row[3].startswith("…"):
            listed.setdefault(kind, set()).add(row[3].rsplit(" ×", 1)[0])
    used: dict[str, set] = {}
    for lp in plan.layers:
        used.setdefault(lp.kind.removesuffix("_proj"), set()).add(lp.format)
    assert listed.keys() == used.keys()
    for k, names in listed.items():  # up to four formats a kind, the rest counted
        assert names <= used[k] and len(names) == min(4, len(used[k]))
    uniform = [row[3] for row in body_cells(text, "Pareto sweep")]
    assert len(uniform) == 5 and set(uniform) <= set(long)


def words(result):
    """(code, stdout, stderr) with runs of whitespace as one space: rich wraps long lines at the console's width."""
    code, out, err = result
    return code, " ".join(out.split()), " ".join(err.split())


def test_solve_says_which_rounding_the_plan_is_for_and_whether_its_profile_can_serve_it(
        monkeypatch, capsys, profile_dir, tmp_path, cli):
    out = tmp_path / "plan.json"
    note = "needs the Hessian factors (hessians/)"
    code, stdout, _ = words(cli("solve", profile_dir, "--budget", "4bpw", "-o", out))
    assert code == 0 and "rounding yaqa" in stdout and json.loads(out.read_text())["rounding"] == "yaqa"
    assert note in stdout and "--objective hessian" in stdout  # a profile folder without hessians/
    code, stdout, _ = words(cli("solve", profile_dir, "--budget", "4bpw", "-o", out,
                                "--objective", "hessian"))
    assert code == 0 and "rounding rtn" in stdout and note not in stdout  # round-to-nearest needs no factors
    (profile_dir / "hessians").mkdir()
    code, stdout, _ = words(cli("solve", profile_dir, "--budget", "4bpw", "-o", out))
    assert code == 0 and "rounding yaqa" in stdout and note not in stdout


def test_apply_rounds_with_the_plans_rounding_unless_told(monkeypatch, tmp_path):
    """`--rounding` defaults to None, which apply_plan reads as the plan's rounding."""
    from typer.testing import CliRunner

    import bitplan.apply
    from bitplan.apply.run import ApplyResult
    from bitplan.cli import app

    seen = []

    def fake_apply_plan(plan, out, **kwargs):
        seen.append(kwargs["rounding"])
        return ApplyResult(out_dir=Path(out), formats={}, stats={})

    monkeypatch.setattr(bitplan.apply, "apply_plan", fake_apply_plan)
    runner = CliRunner()
    for args, expected in (([], None), (["--rounding", "ldlq"], "ldlq")):
        result = runner.invoke(app, ["apply", str(tmp_path / "plan.json"), "-o", str(tmp_path / "q"), *args])
        assert result.exit_code == 0, result.output
        assert seen[-1] == expected
