"""The `bitplan` command line: a thin typer layer over the Python API.

Each command lives in its own module under `bitplan/cli/` and registers itself on `app`;
the modules do argument parsing and printing only, the work is done by `bitplan.*` functions.
"""
from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.segment import Segments
from rich.table import Table

from .. import __version__
from ..errors import BitplanError


class _PlainFlags:
    """typer's help shows every option's type, `<bool>` beside a flag as if it took a value: flags show none."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class _Command(_PlainFlags, typer.core.TyperCommand):
    pass


class _Group(_PlainFlags, typer.core.TyperGroup):
    pass


app = typer.Typer(
    cls=_Group,
    name="bitplan",
    help="Plan and produce non-uniform low-bit quantizations of LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# No emoji codes: rich would print `--sweep A:B:STEP` as `--sweep A🅱STEP`.
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)


def add_name_column(table: Table, header: str, **kwargs) -> None:
    """A column of names that users type back (formats into --formats and --pin, layers into --pin regexes)."""
    table.add_column(header, no_wrap=True, **kwargs)


def print_table(table: Table, out: Console | None = None) -> None:
    """Print `table` with no word cut short. Rich fits a table to the console by cutting cells (`higgs-p2-…` at
    80 columns, although users type format names back into --formats and --pin); here every column keeps at least
    its longest word, the room left goes to the columns in proportion to what wrapping them would save, and a
    table whose words alone are wider than the console is printed wider than it."""
    out = out or console
    wide = out.options.update_width(1 << 16)
    lo, hi = [], []
    for column in table.columns:
        sizes = [Measurement.get(out, wide, cell) for cell in (column.header, *column.cells)]
        lo.append(max(max(m.minimum for m in sizes), column.min_width or 0))
        hi.append(max(max(m.maximum for m in sizes), lo[-1]))
    frame = Measurement.get(out, wide, table).maximum - sum(hi)  # borders and padding
    room = out.width - frame
    if sum(hi) <= room:
        out.print(table)
        return
    widths = list(lo)
    slack = [h - w for h, w in zip(hi, lo)]
    if room > sum(lo):
        share = [(room - sum(lo)) * s // sum(slack) for s in slack]
        widths = [w + s for w, s in zip(widths, share)]
        for i in sorted(range(len(widths)), key=lambda i: -slack[i])[:room - sum(widths)]:
            widths[i] += 1
    for column, width in zip(table.columns, widths):
        column.width = width
    total = sum(widths) + frame
    out.print(Segments(list(out.render(table, out.options.update_width(total)))), crop=False, end="")


def _print_version(value: bool) -> None:
    if value:
        console.print(f"bitplan {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="print bitplan's version and exit")) -> None:
    """Plan and produce non-uniform low-bit quantizations of LLMs: profile → solve → apply → eval."""

# Command modules register themselves on `app` when imported; each gets the plain-flag help.
from . import commands  # noqa: E402,F401

for _info in app.registered_commands:
    if _info.cls in (None, typer.core.TyperCommand):
        _info.cls = _Command


def _interrupted() -> None:
    """Ctrl-C: exit 130 (as a shell reports SIGINT) with the command that resumes; long jobs keep finished work."""
    import shlex

    command = " ".join(shlex.quote(a) for a in ["bitplan", *sys.argv[1:]])
    err_console.print(f"[yellow]interrupted:[/] run the same command again to resume: {escape(command)}",
                      highlight=False, soft_wrap=True)
    sys.exit(130)


def main() -> None:
    """Console-script entry point: bad input ends in one red line and exit code 2, never a traceback; Ctrl-C
    ends in exit code 130 and the command that resumes."""
    try:
        # Without standalone mode typer returns an exit code rather than exiting (130 after Ctrl-C)
        code = app(standalone_mode=False)
    except BitplanError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted()
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
    if code == 130:
        _interrupted()
    if "torch.distributed" in sys.modules:  # under torchrun: every rank finished the command
        from ..distributed import Ranks

        Ranks.close()
    if isinstance(code, int) and not isinstance(code, bool) and code:
        sys.exit(code)
