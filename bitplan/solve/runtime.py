"""What a plan must satisfy for a serving runtime (`solve --runtime`), checked on the plan's layers.

vLLM: every format one it runs on the layer's shape (`bitplan.formats.runtimes`), the token embedding and head unquantized
(`bitplan export compressed-tensors` writes them in fp16, as llm-compressor does by default), and the shards it fuses into one module (q/k/v → `qkv_proj`,
gate/up → `gate_up_proj`) in one format per block, since a fused module has one scheme.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from ..errors import BitplanError
from ..formats import get_format, unsupported_reason
from ..formats.runtimes import check_runtime
from ..profile.schema import OUTER_KINDS

# tie groups (problem.TIE_GROUPS names) a runtime fuses into one module, and the module it makes
FUSED = {"vllm": {"qkv": "qkv_proj", "gateup": "gate_up_proj"}}
_FAMILIES = {"qkv": ("q", "k", "v"), "gateup": ("gate", "up")}


class PlannedLayer(Protocol):
    name: str
    format: str
    block: int
    kind: str
    shape: tuple[int, int]


def forced_ties(runtime: str) -> list[str]:
    """The tie groups `runtime` needs (its fused modules)."""
    return list(FUSED.get(check_runtime(runtime), {}))


def runtime_violation(layers: Iterable[PlannedLayer], runtime: str) -> str | None:
    """The first reason `runtime` cannot run these layers' formats, naming the layer; None where it can."""
    runtime = check_runtime(runtime)
    if runtime == "any":
        return None
    layers = list(layers)
    for lp in layers:
        reason = unsupported_reason(lp.format, runtime, tuple(lp.shape))
        if reason:
            return f"layer {lp.name} is {lp.format}, which {runtime} cannot run: {reason}"
        if lp.kind in OUTER_KINDS and get_format(lp.format).kind != "fp16":
            return (f"layer {lp.name} ({lp.kind}) is {lp.format}, but bitplan's compressed-tensors "
                    "export writes the token embedding and output head in fp16; keep it fp16")
    for tie, module in FUSED[runtime].items():
        first: dict[int, PlannedLayer] = {}
        for lp in layers:
            if lp.kind.removesuffix("_proj") not in _FAMILIES[tie]:
                continue
            other = first.setdefault(lp.block, lp)
            if other.format != lp.format:
                return (f"layer {lp.name} is {lp.format} but {other.name} is {other.format}: {runtime} fuses them "
                        f"into one {module} with one scheme; solve with --runtime {runtime} (it ties them)")
    return None


def check_plan_runtime(layers: Iterable[PlannedLayer], runtime: str, where: str = "plan") -> None:
    """BitplanError with `runtime_violation`'s reason, if any."""
    problem = runtime_violation(layers, runtime)
    if problem:
        raise BitplanError(f"{where}: a {runtime} plan, but {problem}")
