"""What a plan did, in numbers a person can read: formats and bits by projection kind and by depth, the layers
with the largest predicted ΔKL, and the comparison with the best uniform format. The CLI renders these."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from .plan import LayerPlan, Plan
from .problem import kind_family

KIND_ORDER = ("q", "k", "v", "o", "gate", "up", "down")


def _kind_key(kind: str) -> tuple[int, str]:
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), kind)


def _bpw(layers: list[LayerPlan]) -> float:
    return sum(lp.storage_bits for lp in layers) / sum(lp.params for lp in layers)


def _dkl(layers: list[LayerPlan]) -> float | None:
    values = [lp.predicted_dkl for lp in layers]
    return None if any(v is None for v in values) else float(sum(values))


@dataclass
class KindRow:
    kind: str
    layers: int
    bpw: float                          # storage bits per weight over this kind's layers
    formats: list[tuple[str, int]]      # format, count; most used first
    predicted_dkl: float | None


def by_kind(plan: Plan) -> list[KindRow]:
    groups: dict[str, list[LayerPlan]] = {}
    for lp in plan.layers:
        groups.setdefault(kind_family(lp.kind), []).append(lp)
    return [KindRow(kind, len(ls), _bpw(ls), Counter(lp.format for lp in ls).most_common(), _dkl(ls))
            for kind, ls in sorted(groups.items(), key=lambda kv: _kind_key(kv[0]))]


def by_depth(plan: Plan, n_ranges: int = 6) -> tuple[list[str], list[str], list[list[float | None]]]:
    """(block range labels, kinds, bpw[range][kind]): where in the stack the bits went."""
    blocks = sorted({lp.block for lp in plan.layers})
    size = max(1, math.ceil(len(blocks) / n_ranges))
    ranges = [blocks[i:i + size] for i in range(0, len(blocks), size)]
    kinds = sorted({kind_family(lp.kind) for lp in plan.layers}, key=_kind_key)
    labels = [f"{r[0]}" if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in ranges]
    grid = []
    for r in ranges:
        members = set(r)
        row = []
        for kind in kinds:
            ls = [lp for lp in plan.layers if lp.block in members and kind_family(lp.kind) == kind]
            row.append(_bpw(ls) if ls else None)
        grid.append(row)
    return labels, kinds, grid


def top_layers(plan: Plan, k: int = 8) -> list[LayerPlan]:
    ranked = [lp for lp in plan.layers if lp.predicted_dkl is not None]
    return sorted(ranked, key=lambda lp: -lp.predicted_dkl)[:k]


def comparison(plan: Plan) -> str:
    t, u = plan.totals, plan.uniform
    # the uniform baseline's bpw is in the scope's sense: over every planned weight with scope all
    bpw = t["planned_bpw"] if plan.scope == "all" and "planned_bpw" in t else t["storage_bpw"]
    mine = f"plan {bpw:.4f} bpw{' (all planned weights)' if plan.scope == 'all' else ''}, " \
           f"predicted ΔKL {t['predicted_dkl']:.4g}"
    if not u:
        return mine + "; no single candidate format fits this budget"
    ratio = u["predicted_dkl"] / t["predicted_dkl"] if t["predicted_dkl"] else math.inf
    return (f"{mine}  vs  best uniform {u['format']} {u['storage_bpw']:.4f} bpw, predicted ΔKL "
            f"{u['predicted_dkl']:.4g}  ({ratio:.2f}× the plan's)")
