"""Format names → Format objects; the full catalogue and the solver's default candidate set.

Each format's `mse_q` (relative MSE on i.i.d. N(0, 1) matrices) is measured by
`python -m bitplan.formats.generate_grids` and read from `data/formats.json`.
"""
from __future__ import annotations

import difflib
import functools
import json
import re
from importlib import resources

from ..errors import BitplanError
from .base import Format
from .fp16 import FP16Format
from .ggml import GGML_NAMES, GgmlFormat
from .grids import GRID_SIZES
from .higgs import GridFormat
from .integer import IntFormat
from .vllm_int import SymIntFormat, ZeroPointIntFormat

GRID_GROUPS = (64, 128, 256)
INT_BITS = tuple(range(2, 9))
INT_GROUPS = (32, 64, 128)

_GRID_RE = re.compile(r"higgs-p(\d+)-n(\d+)-g(\d+)")
_INT_RE = re.compile(r"(s|u|)int(\d+)-g(\d+)")
_INT_CLASSES = {"": IntFormat, "s": SymIntFormat, "u": ZeroPointIntFormat}


def all_format_names() -> list[str]:
    names = [f"higgs-p{p}-n{n}-g{g}" for p, ns in GRID_SIZES.items() for n in ns for g in GRID_GROUPS]
    names += [f"{kind}int{b}-g{g}" for kind in ("", "s", "u") for b in INT_BITS for g in INT_GROUPS]
    return names + list(GGML_NAMES) + ["fp16"]


@functools.lru_cache(maxsize=1)
def _valid_names() -> frozenset[str]:
    return frozenset(all_format_names())


@functools.lru_cache(maxsize=1)
def measured_mse() -> dict[str, float]:
    f = resources.files("bitplan.formats").joinpath("data", "formats.json")
    if not f.is_file():
        raise BitplanError("format MSE table missing (bitplan/formats/data/formats.json); "
                           "run `python -m bitplan.formats.generate_grids`")
    return {k: float(v["mse_q"]) for k, v in json.loads(f.read_text())["formats"].items()}


def build_format(name: str, mse_q: float) -> Format:
    """A Format object for a valid name with the given mse_q (the generator measures mse_q with these)."""
    if name not in _valid_names():
        raise _unknown(name)
    if name == "fp16":
        return FP16Format.make(mse_q)
    if name in GGML_NAMES:
        return GgmlFormat.make(name, mse_q)
    m = _GRID_RE.fullmatch(name)
    if m:
        p, n, g = map(int, m.groups())
        return GridFormat.make(p, n, g, mse_q)
    kind, b, g = _INT_RE.fullmatch(name).groups()
    return _INT_CLASSES[kind].make(int(b), int(g), mse_q)


def _unknown(name) -> BitplanError:
    close = difflib.get_close_matches(str(name), all_format_names(), n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return BitplanError(
        f"unknown format {name!r}{hint} Valid names: higgs-p{{p}}-n{{n}}-g{{64,128,256}} (p=1: n=4..256, "
        "p=2: n=8..4096, p=3: n=16..4096, p=4: n=64..4096, n a power of two), int{2..8}-g{32,64,128}, "
        "sint{2..8}-g{32,64,128}, uint{2..8}-g{32,64,128}, "
        f"the ggml types {', '.join(GGML_NAMES)}, fp16 (`bitplan formats` lists them)"
    )


@functools.lru_cache(maxsize=None)
def _get(name: str) -> Format:
    if name not in _valid_names():
        raise _unknown(name)
    table = measured_mse()
    if name not in table:
        raise BitplanError(f"no measured mse_q for {name} in bitplan/formats/data/formats.json; "
                           "run `python -m bitplan.formats.generate_grids`")
    return build_format(name, table[name])


def get_format(name: str) -> Format:
    """The Format called `name` (e.g. `higgs-p2-n256-g128`, `int4-g128`, `fp16`)."""
    if isinstance(name, Format):
        return name
    if not isinstance(name, str):
        raise _unknown(name)
    return _get(name.strip())


def all_formats() -> list[Format]:
    return [get_format(n) for n in all_format_names()]


def ggml_candidates() -> list[Format]:
    """The `ggml` menu: ggml's twelve block types (q2_K … q8_0) and fp16 as the fallback, by bits per weight.
    A layer takes only those whose block fits its rows (`Format.applicable`)."""
    return sorted((get_format(n) for n in (*GGML_NAMES, "fp16")), key=lambda f: (f.nominal_bits, f.name))


# Grid sizes in the default candidate set (g = 128): each p covers the bit range where it is competitive,
# p = 1 reaches 8 bits and keeps the kernel-friendly scalar grids.
_DEFAULT_GRIDS = {
    1: (8, 16, 32, 64, 128, 256),  # 3 .. 8 bits
    2: (16, 32, 64, 128, 256, 512, 1024, 2048, 4096),  # 2 .. 6 bits
    3: (128, 256, 512, 1024, 2048, 4096),  # 2.33 .. 4 bits
    4: (64, 128, 256, 512, 1024, 2048, 4096),  # 1.5 .. 3 bits
}
_DEFAULT_INTS = [f"int{b}-g128" for b in INT_BITS] + ["int2-g64", "int3-g64", "int4-g64"]


def default_candidates() -> list[Format]:
    """The solver's default set: 28 grid formats (g = 128), 10 integer formats and fp16; ≈ 1.6 to 8.3 bpw
    storage-inclusive (plus fp16 at 16), sorted by bits per weight of a 4096×4096 layer."""
    names = [f"higgs-p{p}-n{n}-g128" for p, ns in _DEFAULT_GRIDS.items() for n in ns] + _DEFAULT_INTS + ["fp16"]
    return sorted((get_format(n) for n in names), key=lambda f: (f.bits_per_weight(4096, 4096), f.name))


def format_summary(fmt: Format, m: int = 4096, n: int = 4096) -> dict:
    """One format's numbers for tables and JSON: bits (nominal and storage-inclusive at an m×n layer), mse_q and
    its ratio to Shannon's bound 4^-bits for a Gaussian source at the nominal bits."""
    return {
        "name": fmt.name, "kind": fmt.kind, "nominal_bits": fmt.nominal_bits, "group_size": fmt.group_size,
        "vector_dim": fmt.vector_dim, "code_bits": fmt.code_bits, "rotated": fmt.rotated,
        "codebook_bits": fmt.codebook_bits, "bits_per_weight": fmt.bits_per_weight(m, n), "layer_shape": [m, n],
        "mse_q": fmt.mse_q, "shannon_ratio": fmt.mse_q / 4.0 ** (-fmt.nominal_bits),
    }
