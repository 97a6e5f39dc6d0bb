"""Which formats a serving runtime runs: the one rule the solver (`solve --runtime`) and the exporters share.

`any`: every bitplan format (bitplan's own loader runs them all). `vllm`: what vLLM's compressed-tensors path
runs (`WNA16` schemes): symmetric integers `sint{2..8}` and asymmetric integers with an integer zero point only at
4 and 8 bits (`uint4`, `uint8`), groups of 32, 64 or 128 along the input dimension, no per-layer rotation; and
`fp16`, an unquantized layer (listed in compressed-tensors' `ignore`).
"""
from __future__ import annotations

from ..errors import BitplanError
from .base import Format
from .registry import INT_BITS, INT_GROUPS, get_format

RUNTIMES = ("any", "vllm")
VLLM_ZERO_POINT_BITS = (4, 8)


def check_runtime(runtime: str | None) -> str:
    name = "any" if runtime is None else str(runtime).strip().lower()
    if name not in RUNTIMES:
        raise BitplanError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    return name


def vllm_format_names() -> list[str]:
    names = [f"sint{b}-g{g}" for b in INT_BITS for g in INT_GROUPS]
    names += [f"uint{b}-g{g}" for b in VLLM_ZERO_POINT_BITS for g in INT_GROUPS]
    return names + ["fp16"]


def vllm_candidates() -> list[Format]:
    """The `vllm` menu: every format vLLM runs, by bits per weight of a 4096×4096 layer."""
    return sorted((get_format(n) for n in vllm_format_names()), key=lambda f: (f.bits_per_weight(4096, 4096), f.name))


def unsupported_reason(fmt: Format | str, runtime: str, shape: tuple[int, int] | None = None) -> str | None:
    """Why `runtime` cannot run `fmt` (on a layer of `shape` [out, in], when given), or None where it can."""
    runtime = check_runtime(runtime)
    fmt = get_format(fmt)
    if runtime == "any":
        return None
    if fmt.name not in vllm_format_names():
        if fmt.rotated:
            return "it rotates each layer with its own random Hadamard transforms, which vLLM cannot apply"
        if fmt.kind == "uint":
            return "vLLM runs integer zero points only at 4 and 8 bits; use a sint format"
        if fmt.kind == "ggml":
            return "ggml's block types are llama.cpp's, not compressed-tensors'"
        return f"vLLM's compressed-tensors path has no {fmt.kind} scheme"
    if shape is not None and fmt.group_size and shape[1] % fmt.group_size:
        return (f"its {shape[1]} inputs are not a whole number of groups of {fmt.group_size}, which "
                "compressed-tensors and vLLM need; use a group size that divides them")
    return None


def runtime_formats(runtime: str) -> list[Format]:
    """The formats `runtime` runs (for `any`, every format)."""
    from .registry import all_formats

    return all_formats() if check_runtime(runtime) == "any" else vllm_candidates()
