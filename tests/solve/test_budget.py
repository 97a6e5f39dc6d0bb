"""Budget strings: units, exactness, and the errors a user sees."""
from __future__ import annotations

from fractions import Fraction

import pytest

from bitplan.errors import BitplanError
from bitplan.solve.budget import parse_budget, parse_sweep


@pytest.mark.parametrize("text, kind, value", [
    ("3.25bpw", "bpw", Fraction(13, 4)),
    (" 2.5 BPW ", "bpw", Fraction(5, 2)),
    ("3", "bpw", Fraction(3)),
    ("2.1GB", "bytes", Fraction(21, 10) * 10**9),
    ("1.8GiB", "bytes", Fraction(9, 5) * 2**30),
    ("500MB", "bytes", Fraction(500 * 10**6)),
    ("700MiB", "bytes", Fraction(700 * 2**20)),
    ("1e3kb", "bytes", Fraction(10**6)),
])
def test_units(text, kind, value):
    b = parse_budget(text)
    assert (b.kind, b.value) == (kind, value)


def test_bpw_bits_are_exact_not_float():
    # 0.1 × 30 is 3.0000000000000004 in floats; the budget must be exactly 3 bits, floor of an exact product.
    assert parse_budget("0.1bpw").bits(30) == 3
    assert parse_budget("3.25bpw").bits(106_168_320) == 345_047_040
    assert parse_budget("2.1GB").bits(1) == 16_800_000_000
    assert parse_budget(3.25).bits(4) == 13


@pytest.mark.parametrize("text, message", [
    ("0bpw", "positive"), ("-3bpw", "positive"), ("0GB", "positive"), ("-1.5GiB", "positive"),
    ("1e400bpw", "too large"), ("1e400GB", "too large"), ("2e6bpw", "too large"),
    ("3.25 bits", "unit"), ("lots", "cannot read"), ("", "cannot read"), ("1.2.3bpw", "cannot read"),
])
def test_bad_budgets(text, message):
    with pytest.raises(BitplanError, match=message):
        parse_budget(text)


def test_sweep_ranges():
    assert parse_sweep("2.5:4.5:0.25") == [Fraction(10 + i, 4) for i in range(9)]
    assert parse_sweep("3:3:1") == [Fraction(3)]
    assert parse_sweep("2.5bpw:3bpw:0.5") == [Fraction(5, 2), Fraction(3)]
    for bad in ("2.5:4.5", "4:2:0.5", "2:3:0", "a:b:c", "0:1:0.5", "1:1000:0.5"):
        with pytest.raises(BitplanError):
            parse_sweep(bad)
