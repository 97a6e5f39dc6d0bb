"""The console entry point's exit codes and early refusals: Ctrl-C is 130 with the command that resumes, and bad
options or output paths are refused before any model loads."""
from __future__ import annotations

import sys

import pytest

import bitplan.apply
import bitplan.profile
from bitplan.cli import main


def run_main(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["bitplan", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code


def interrupted(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["profile", "apply"])
def test_ctrl_c_exits_130_with_the_command_that_resumes(command, tmp_path, monkeypatch, capsys):
    if command == "profile":
        monkeypatch.setattr(bitplan.profile, "profile_model", interrupted)
        args = ["profile", tmp_path / "model", "--out", tmp_path / "prof"]
    else:
        monkeypatch.setattr(bitplan.apply, "apply_plan", interrupted)
        args = ["apply", tmp_path / "plan.json", "-o", tmp_path / "q"]
    assert run_main(monkeypatch, *args) == 130
    err = " ".join(capsys.readouterr().err.split())
    assert "interrupted" in err and "run the same command again" in err
    assert f"bitplan {command} " in err and str(tmp_path / "model" if command == "profile" else tmp_path) in err


@pytest.mark.parametrize("option", [["--halves", "bogus"], ["--batch-size", "0"], ["--sketch-chunk", "0"],
                                    ["--checkpoint-every", "0"], ["--noise-samples", "-1"]])
def test_profile_options_are_checked_before_the_model_loads(option, tmp_path, monkeypatch, capsys):
    """tmp_path holds no model: were the model loaded first, its error would come instead."""
    assert run_main(monkeypatch, "profile", tmp_path, *option) == 2
    err = capsys.readouterr().err
    assert option[0] in err and "config.json" not in err


def test_output_paths_are_checked_before_any_work(tmp_path, monkeypatch, capsys):
    """No model, profile or plan exists here: each command's error is about its output path, so it came first."""
    nowhere = tmp_path / "no-model"
    folder = tmp_path / "folder"
    (folder / "plan.json").mkdir(parents=True)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    cases = [
        (["eval", "-r", nowhere, "-c", nowhere, "--json", folder], "is a folder"),
        (["eval", "-r", nowhere, "-c", nowhere, "--json", "/dev/null/x.json"], "/dev/null is not a folder"),
        (["solve", nowhere, "--budget", "3bpw", "-o", folder], "is a folder"),
        (["solve", nowhere, "--budget", "3bpw", "-o", "/dev/null/x"], "/dev/null is not a folder"),
        (["apply", tmp_path / "plan.json", "-o", precious], "refusing to overwrite"),
        (["apply", tmp_path / "plan.json", "-o", "/dev/null/x"], "/dev/null is not a folder"),
        (["profile", nowhere, "--out", "/dev/null/x"], "/dev/null is not a folder"),
    ]
    for args, expected in cases:
        assert run_main(monkeypatch, *args) == 2, args
        err = " ".join(capsys.readouterr().err.split())
        assert expected in err, (args, err)
    assert (precious / "notes.txt").read_text() == "keep me"
