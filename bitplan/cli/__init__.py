"""The `bitplan` command line: a thin typer layer over the Python API.

Each command lives in its own module under `bitplan/cli/` and registers itself on `app`;
the modules do argument parsing and printing only, the work is done by `bitplan.*` functions.
"""
from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import BitplanError

app = typer.Typer(
    name="bitplan",
    help="Plan and produce non-uniform low-bit quantizations of LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Plan and produce non-uniform low-bit quantizations of LLMs: profile → solve → apply → eval."""

# Command modules register themselves on `app` when imported.
from . import commands  # noqa: E402,F401


def main() -> None:
    """Console-script entry point: bad input ends in one red line and exit code 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except BitplanError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:
        # Usage errors come from the click that typer bundles; recognise them by shape, not by import path.
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            sys.exit(1)
        raise
