"""The commands the README and docs/ show are commands that exist: every `bitplan SUB --opt` names a subcommand
that takes `--opt`, and every `python SCRIPT --opt` names a script in the repository whose --help lists `--opt`."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from bitplan.cli import app

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "experiments" / "README.md",
        REPO / "profiles" / "smollm2-135m" / "README.md"]


def shell_lines(path: Path) -> list[str]:
    """Commands in the ```bash blocks of a markdown file and in its inline `…` spans, continuation lines joined."""
    text = path.read_text(encoding="utf-8")
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        block = re.sub(r"\\\n\s*", " ", block)
        lines += [line.split(" #")[0].strip() for line in block.splitlines()]
    # Inline spans may wrap across lines in a paragraph.
    lines += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))]
    return [line for line in lines if line]


def commands(line: str) -> list[list[str]]:
    """Each `bitplan …` / `python X.py …` command in a shell line (split at &&, ;, |), as tokens."""
    out = []
    for part in re.split(r"&&|;|\|", line):
        try:
            tokens = shlex.split(part)
        except ValueError:
            continue
        while tokens and ("=" in tokens[0] and not tokens[0].startswith("-") or tokens[0] in ("/usr/bin/time", "-v")):
            tokens = tokens[1:]               # environment assignments, `time -v`
        if tokens and tokens[0] == "torchrun":
            tokens = tokens[tokens.index("-m") + 1:] if "-m" in tokens else []
        if tokens and (tokens[0] == "bitplan" or (tokens[0] == "python" and len(tokens) > 1 and tokens[1].endswith(".py"))):
            out.append(tokens)
    return out


def options(tokens: list[str]) -> set[str]:
    return {t.split("=")[0] for t in tokens if t.startswith("--")}


def documented() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        if path.exists():
            for line in shell_lines(path):
                found += [(path.name, tokens) for tokens in commands(line)]
    return found


def cli_options() -> dict[str, set[str]]:
    group = typer.main.get_command(app)
    known = {}
    for name, cmd in group.commands.items():
        known[name] = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
        for sub, subcmd in getattr(cmd, "commands", {}).items():   # a command group: `bitplan export gguf`
            known[f"{name} {sub}"] = {opt for p in subcmd.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
    return known


def test_the_docs_show_commands():
    found = documented()
    assert sum(tokens[0] == "bitplan" for _, tokens in found) >= 10
    assert sum(tokens[0] == "python" for _, tokens in found) >= 5


def test_every_documented_bitplan_command_takes_its_options():
    known = cli_options()
    wrong = []
    for source, tokens in documented():
        if tokens[0] != "bitplan" or len(tokens) < 2 or tokens[1].startswith("-"):
            continue
        sub = tokens[1]
        if len(tokens) > 2 and f"{sub} {tokens[2]}" in known:
            sub = f"{sub} {tokens[2]}"
        if sub not in known:
            wrong.append(f"{source}: bitplan {sub}: no such command")
        elif options(tokens) - known[sub]:
            wrong.append(f"{source}: bitplan {sub} does not take {sorted(options(tokens) - known[sub])}")
    assert not wrong, "\n".join(wrong)


def test_the_option_check_catches_a_wrong_option():
    """The check above is not vacuous: an option no command has is reported."""
    known = cli_options()
    assert "--budget" in known["solve"]
    assert "--no-such-option" not in known["solve"]


def _script_help(script: str) -> str:
    run = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert run.returncode == 0, f"python {script} --help failed:\n{run.stderr[-2000:]}"
    return run.stdout


def test_every_documented_script_exists_and_takes_its_options():
    scripts: dict[str, set[str]] = {}
    for _, tokens in documented():
        if tokens[0] == "python":
            scripts.setdefault(tokens[1], set()).update(options(tokens))
    missing = [s for s in scripts if not (REPO / s).is_file()]
    assert not missing, f"documented scripts that do not exist: {missing}"
    wrong = []
    for script, opts in sorted(scripts.items()):
        help_text = _script_help(script)
        wrong += [f"python {script} does not take {o}" for o in sorted(opts - {"--help"})
                  if not re.search(re.escape(o) + r"\b", help_text)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("sub", ["profile", "solve", "apply", "eval", "formats"])
def test_help_runs(sub):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [sub, "--help"])
    assert result.exit_code == 0, result.output
