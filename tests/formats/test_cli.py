"""`bitplan formats`: the table, the JSON, and a bad option ending in one line and exit code 2."""
from __future__ import annotations

import io
import json

from bitplan.formats import all_formats, default_candidates




def test_json_lists_every_format(monkeypatch, capsys, cli):
    code, out, _ = cli("formats", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == [f.name for f in all_formats()]
    r = next(r for r in rows if r["name"] == "higgs-p2-n256-g128")
    assert r["bits_per_weight"] == (4096 * 4096 * 4 + 4096 * 32 * 16 + 128) / 4096**2
    assert abs(r["shannon_ratio"] - r["mse_q"] * 256) < 1e-12 and r["default_candidate"]


def test_table_of_candidates(monkeypatch, capsys, cli):
    code, out, _ = cli("formats", "--candidates")
    assert code == 0
    for f in default_candidates():
        assert f.name in out
    assert "higgs-p2-n8-g64" not in out and "int5-g32" not in out  # not candidates


def test_bad_kind(monkeypatch, capsys, cli):
    code, _, err = cli("formats", "--kind", "nf4")
    assert code == 2 and "unknown kind" in err and "Traceback" not in err


def table_cells(text: str, column: int) -> list[str]:
    """The stripped cells of one column of a rich table's body rows (rows drawn between │ borders)."""
    return [line.split("│")[column + 1].strip() for line in text.splitlines() if line.startswith("│")]


def test_format_names_are_never_cut_at_80_columns(monkeypatch, cli):
    """Users type these names into --formats and --pin: at 80 columns rich cut 100 of them to `higgs-pN-…`."""
    from rich.console import Console

    import bitplan.cli.formats_cmd as formats_cmd

    narrow = Console(width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(formats_cmd, "console", narrow)
    code, _, _ = cli("formats")
    assert code == 0
    text = narrow.export_text()
    assert table_cells(text, 0) == [f.name for f in all_formats()]
    assert max(len(line) for line in text.splitlines()) <= 80  # and the table still fits the console
