"""sensitivity.csv (one row per layer, stable column names) and the rich summary of a profile."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
from rich.table import Table

from ..io import atomic_path
from .schema import Profile

# Formats whose predicted round-to-nearest ΔKL gets a column when they are among the candidates.
REFERENCE_FORMATS = ("int4-g128", "int3-g128", "higgs-p2-n256-g128", "higgs-p2-n64-g128", "higgs-p2-n16-g128")

COLUMNS = ["name", "block", "kind", "out_features", "in_features", "params", "weight_sq_norm", "trace_h_in",
           "trace_h_out", "alpha_noise", "alpha_noise_r2", "alpha_hessian", "alpha_shaped", "alpha_yaqa", "yaqa_gain",
           "alpha_yaqa_heldout", "yaqa_gain_heldout", "shrink_out", "shrink_in", "yaqa_gain_heldout_raw",
           "ldlq_gain_heldout"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def alpha_shaped(r) -> float | None:
    """The layer's α at the scale adaptive rounding's errors see (coefficients.py); α_hessian in older profiles."""
    return r.extra.get("alpha_shaped", r.alpha_hessian)


def sensitivity_frame(profile: Profile) -> pd.DataFrame:
    """dkl_<format> = alpha_hessian × rel_err(format): predicted mean per-token ΔKL of quantizing that layer
    alone to the format by round-to-nearest."""
    refs = [f for f in REFERENCE_FORMATS if f in profile.formats]
    rows = []
    for r in profile.layers:
        shaped = alpha_shaped(r)
        row = {"name": r.name, "block": r.block, "kind": r.kind, "out_features": r.shape[0],
               "in_features": r.shape[1], "params": r.params, "weight_sq_norm": r.weight_sq_norm,
               "trace_h_in": r.trace_h_in, "trace_h_out": r.trace_h_out, "alpha_noise": r.alpha_noise,
               "alpha_noise_r2": r.alpha_noise_r2, "alpha_hessian": r.alpha_hessian,
               "alpha_shaped": shaped, "alpha_yaqa": r.alpha_yaqa,
               "yaqa_gain": _ratio(r.alpha_yaqa, shaped), "alpha_yaqa_heldout": r.alpha_yaqa_heldout,
               "yaqa_gain_heldout": _ratio(r.alpha_yaqa_heldout, shaped),
               **{k: r.extra.get(k) for k in ("shrink_out", "shrink_in", "yaqa_gain_heldout_raw",
                                              "ldlq_gain_heldout")}}
        for f in refs:
            t2 = r.rel_err.get(f)
            row[f"dkl_{f}"] = None if t2 is None or r.alpha_hessian is None else r.alpha_hessian * t2
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS + [f"dkl_{f}" for f in refs])


def write_csv(profile: Profile, path: str | Path) -> pd.DataFrame:
    df = sensitivity_frame(profile)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    return df


def spearman(a, b) -> float | None:
    from scipy.stats import spearmanr

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None
             and not (isinstance(x, float) and math.isnan(x)) and not (isinstance(y, float) and math.isnan(y))]
    if len(pairs) < 3:
        return None
    rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    return None if math.isnan(rho) else float(rho)


def summary_line(profile: Profile) -> str:
    L = profile.layers
    rho = spearman([r.alpha_hessian for r in L], [r.alpha_noise for r in L])
    gains = sorted(_ratio(r.alpha_yaqa_heldout, alpha_shaped(r)) for r in L if r.alpha_yaqa_heldout is not None)
    parts = [f"{len(L)} layers", f"{profile.calibration.get('tokens', '?')} calibration tokens"]
    if rho is not None:
        parts.append(f"Spearman(α_hessian, α_noise) = {rho:.3f}")
    if gains:
        parts.append(f"median held-out YAQA gain {gains[len(gains) // 2]:.3f}")
    return ", ".join(parts)


def short_name(name: str) -> str:
    """`model.layers.3.mlp.down_proj` → `3.mlp.down`, `…self_attn.q_proj` → `3.attn.q`: tables fit 80 columns."""
    name = re.sub(r"^.*?\blayers\.(\d+)\.", r"\1.", name)
    return name.replace("self_attn.", "attn.").removesuffix("_proj")


def sensitivity_table(profile: Profile, top: int = 8) -> Table:
    """The most and the least sensitive layers by α_hessian (α_noise alongside)."""
    ranked = sorted((r for r in profile.layers if r.alpha_hessian is not None), key=lambda r: -r.alpha_hessian)
    table = Table(title="Most and least sensitive layers (mean per-token ΔKL per unit t²)")
    table.add_column("layer", no_wrap=True)
    for col in ("α_hessian", "α_noise", "R²", "α_yaqa_ho", "gain_ho"):
        table.add_column(col, justify="right", no_wrap=True)
    table.caption = "α_yaqa_ho, gain_ho: after two-sided LDLQ, held-out (LDL on one calibration half, judged on the other)"

    def fmt(x: float | None, spec: str = ".3g") -> str:
        return "–" if x is None else format(x, spec)

    def add(r) -> None:
        table.add_row(short_name(r.name), fmt(r.alpha_hessian), fmt(r.alpha_noise),
                      fmt(r.alpha_noise_r2, ".3f"), fmt(r.alpha_yaqa_heldout),
                      fmt(_ratio(r.alpha_yaqa_heldout, alpha_shaped(r)), ".3f"))

    head = ranked[:top]
    tail = ranked[max(top, len(ranked) - top):]
    for r in head:
        add(r)
    if tail:
        table.add_section()
        for r in tail:
            add(r)
    return table
