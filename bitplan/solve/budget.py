"""Budgets: `3.25bpw` (storage bits per weight over the block linears) or a whole-file size (`2.1GB`, `1.8GiB`).

A bpw budget limits what the block linears write: their codes, scales, zeros and rotation seeds plus the grid
codebooks they use. A size budget limits the whole checkpoint: the same, plus the tensors kept in fp16
(embedding, untied head, norms). Parsing uses exact decimals so `3.25bpw` is 3.25 × weights bits, not a float
one bit short of it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

from ..errors import BitplanError

BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# Far above any model (fp16 is 16 bpw; an exabyte): larger numbers are typos, and beyond ~1e308 not even floats.
MAX_BPW = 10**6
MAX_BYTES = 10**18
_RE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]+)\s*")


@dataclass(frozen=True)
class Budget:
    given: str          # as the user wrote it
    kind: str           # "bpw" or "bytes"
    value: Fraction     # bits per weight, or bytes

    def bits(self, block_weights: int) -> int:
        """Total bits this budget allows for what it measures (block linears for bpw, the whole file for bytes)."""
        if self.kind == "bpw":
            return math.floor(self.value * block_weights)
        return math.floor(self.value * 8)

    def describe(self) -> str:
        if self.kind == "bpw":
            return f"{float(self.value):g} bits per weight (storage, block linears, codebooks included)"
        return f"{float(self.value):,.0f} bytes (whole file: block linears, codebooks, fp16 extras)"


def parse_budget(text: str | float | Budget) -> Budget:
    """`3.25bpw`, `2.1GB` (10^9 bytes), `1.8GiB`, `500MB`, `700MiB`; a bare number means bits per weight."""
    if isinstance(text, Budget):
        return text
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = f"{text!r}bpw"
    if not isinstance(text, str):
        raise BitplanError(f"budget must be a string like 3.25bpw or 2.1GB, not {type(text).__name__}")
    m = _RE.fullmatch(text) or re.fullmatch(r"\s*([-+]?[0-9.eE+-]+)\s*([a-zA-Z]*)\s*", text)
    if not m:
        raise BitplanError(f"cannot read budget {text!r}: write e.g. 3.25bpw, 2.1GB, 1.8GiB, 500MB or 700MiB")
    number, unit = m.group(1), m.group(2).lower() or "bpw"
    try:
        value = Fraction(number)
    except (ValueError, ZeroDivisionError):
        raise BitplanError(f"cannot read budget {text!r}: {number!r} is not a number") from None
    if value <= 0:
        raise BitplanError(f"budget must be positive, got {text.strip()!r}")
    if unit == "bpw":
        if value > MAX_BPW:
            raise BitplanError(f"budget {text.strip()!r} is too large: at most {MAX_BPW:,} bits per weight "
                               "(fp16 is 16)")
        return Budget(text.strip(), "bpw", value)
    if unit in BYTE_UNITS:
        if value * BYTE_UNITS[unit] > MAX_BYTES:
            raise BitplanError(f"budget {text.strip()!r} is too large: at most {MAX_BYTES:.0e} bytes")
        return Budget(text.strip(), "bytes", value * BYTE_UNITS[unit])
    raise BitplanError(f"unknown budget unit {m.group(2)!r} in {text!r}: use bpw, B, KB, MB, GB, KiB, MiB or GiB")


def parse_sweep(text: str) -> list[Fraction]:
    """`2.5:4.5:0.25` → bpw budgets 2.5, 2.75, …, 4.5 (the end included when the step lands on it)."""
    parts = text.split(":")
    if len(parts) != 3:
        raise BitplanError(f"--sweep wants START:STOP:STEP in bits per weight, e.g. 2.5:4.5:0.25, not {text!r}")
    try:
        start, stop, step = (Fraction(p.strip().removesuffix("bpw")) for p in parts)
    except (ValueError, ZeroDivisionError):
        raise BitplanError(f"--sweep wants three numbers START:STOP:STEP, not {text!r}") from None
    if step <= 0 or start <= 0 or stop < start:
        raise BitplanError(f"--sweep {text}: need 0 < START ≤ STOP and STEP > 0")
    count = int((stop - start) / step) + 1
    if count > 1000:
        raise BitplanError(f"--sweep {text} asks for {count} budgets; use a larger step (at most 1000)")
    return [start + i * step for i in range(count)]
