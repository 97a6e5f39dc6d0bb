"""The command line as a new user meets it: `bitplan --version`, and flags shown as flags in every --help."""
from __future__ import annotations

import re
from importlib.metadata import version

import pytest
import typer
from typer.testing import CliRunner

from bitplan.cli import app

COMMANDS = ("profile", "solve", "apply", "eval", "formats")


def test_version_prints_the_installed_packages_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"bitplan {version('bitplan')}"


def flags_of(args: list[str]) -> list[str]:
    """The long names of the boolean flags of `bitplan ARGS`, from the click command typer builds."""
    group = typer.main.get_command(app)
    ctx = group.make_context("bitplan", list(args) or ["--help"], resilient_parsing=True)
    command = group.get_command(ctx, args[0]) if args else group
    return [next(o for o in p.opts if o.startswith("--")) for p in command.get_params(ctx) if getattr(p, "is_flag", 0)]


@pytest.mark.parametrize("args", [[], *([c] for c in COMMANDS)])
def test_help_shows_flags_without_a_value(args):
    """typer printed `<bool>` beside every flag (--json, --overwrite, --help) as if it took a value."""
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    flags = flags_of(args)
    assert "--help" in flags and (args or "--version" in flags)
    for flag in flags:
        line = next(line for line in result.output.splitlines() if re.search(rf"{re.escape(flag)}\b", line))
        assert "<bool>" not in line, line
    assert "<bool>" not in result.output


def test_options_that_take_a_value_still_show_its_type():
    result = CliRunner().invoke(app, ["formats", "--help"], env={"COLUMNS": "200"})
    assert re.search(r"--m\s+<int>", result.output), result.output
