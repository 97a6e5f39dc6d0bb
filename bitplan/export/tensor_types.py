"""`bitplan export tensor-types`: a plan as llama-quantize's `--tensor-type-file`.

One `PATTERN=TYPE` per line, PATTERN an anchored regular expression that matches exactly one GGUF tensor name
(`^blk\\.3\\.attn_q\\.weight$`): llama-quantize splits each token at its first `=`, lower-cases the name and
searches it as a regex, and reads the tokens separated by spaces or newlines, so the file holds nothing else.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import BitplanError
from ..io import check_writable, write_text
from .arch import ARCHITECTURES, TensorNames
from .gguf_export import format_ggml_type, type_name


@dataclass
class TensorTypes:
    path: Path
    lines: list[str]
    types: dict[str, str]   # GGUF name → ggml type


def nearest_ggml(fmt_name: str, shape: tuple[int, int]) -> str:
    """The ggml format whose storage per weight at `shape` is nearest to `fmt_name`'s (the smaller on a tie)."""
    from ..formats import GGML_NAMES, get_format

    m, n = shape
    bits = get_format(fmt_name).storage_bits(m, n)
    fits = [get_format(g) for g in GGML_NAMES if get_format(g).applicable(m, n)]
    if not fits:
        raise BitplanError(f"no ggml type stores a {m}×{n} matrix")
    return min(fits, key=lambda f: (abs(f.storage_bits(m, n) - bits), f.storage_bits(m, n))).name


def tensor_type_lines(formats: dict[str, str], shapes: dict[str, tuple[int, int]] | None = None,
                      nearest: bool = False) -> tuple[list[str], dict[str, str]]:
    """`formats` (module name → bitplan format) as tensor-type lines. Formats without a ggml type are refused, or
    with `nearest` (and the layers' `shapes`) replaced by the ggml type of the nearest storage per weight."""
    blocks = [int(m.group(1)) for m in (re.search(r"\.(\d+)\.", n) for n in formats) if m]
    names = TensorNames(ARCHITECTURES["LlamaForCausalLM"], max(blocks, default=0) + 1)
    bad = [n for n, f in formats.items() if f != "fp16" and format_ggml_type(f) is None]
    if bad and nearest:
        formats = {n: nearest_ggml(f, tuple(shapes[n])) if n in bad else f for n, f in formats.items()}
    elif bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise BitplanError(f"{len(bad)} layer(s) of the plan are in formats llama.cpp has no type for: "
                           f"{', '.join(f'{n} ({formats[n]})' for n in bad[:3])}{more}; solve the plan with "
                           "`--formats ggml`, or pass `--map nearest` for the ggml type of the nearest bits per "
                           "weight (rounded by llama-quantize, not as planned)")
    lines, types = [], {}
    for module, fmt in formats.items():
        gname = names(f"{module}.weight")
        t = "f16" if fmt == "fp16" else type_name(format_ggml_type(fmt))
        types[gname] = t
        lines.append(f"^{re.escape(gname)}$={t}")
    return lines, types


def export_tensor_types(plan: str | Path, out: str | Path, map_formats: str = "none") -> TensorTypes:
    """Write the plan's layers as llama-quantize tensor-type lines; `map_formats` "nearest" maps formats without a
    ggml type to the ggml type of the nearest storage per weight, "none" refuses them."""
    from ..solve.plan import load_plan

    if map_formats not in ("none", "nearest"):
        raise BitplanError(f"--map {map_formats}: choose none or nearest")
    out = check_writable(out, "file", "tensor-types file")
    loaded = load_plan(plan)
    shapes = {lp.name: tuple(lp.shape) for lp in loaded.layers}
    lines, types = tensor_type_lines(loaded.formats, shapes, nearest=map_formats == "nearest")
    write_text(out, "\n".join(lines) + "\n")
    return TensorTypes(path=Path(out), lines=lines, types=types)
