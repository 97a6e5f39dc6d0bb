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


def tensor_type_lines(formats: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """`formats` (module name → bitplan format) as tensor-type lines; refuses formats without a ggml type."""
    blocks = [int(m.group(1)) for m in (re.search(r"\.(\d+)\.", n) for n in formats) if m]
    names = TensorNames(ARCHITECTURES["LlamaForCausalLM"], max(blocks, default=0) + 1)
    bad = [f"{n} ({f})" for n, f in formats.items() if f != "fp16" and format_ggml_type(f) is None]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise BitplanError(f"{len(bad)} layer(s) of the plan are in formats llama.cpp has no type for: "
                           f"{', '.join(bad[:3])}{more}; solve the plan with `--formats ggml`")
    lines, types = [], {}
    for module, fmt in formats.items():
        gname = names(f"{module}.weight")
        t = "f16" if fmt == "fp16" else type_name(format_ggml_type(fmt))
        types[gname] = t
        lines.append(f"^{re.escape(gname)}$={t}")
    return lines, types


def export_tensor_types(plan: str | Path, out: str | Path) -> TensorTypes:
    from ..solve.plan import load_plan

    out = check_writable(out, "file", "tensor-types file")
    formats = load_plan(plan).formats
    lines, types = tensor_type_lines(formats)
    write_text(out, "\n".join(lines) + "\n")
    return TensorTypes(path=Path(out), lines=lines, types=types)
