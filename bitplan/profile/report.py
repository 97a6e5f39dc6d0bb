"""sensitivity.csv (one row per layer, stable column names) and the rich summary of a profile."""
from __future__ import annotations

import math
import re
from pathlib import Path

from rich.table import Table

from ..errors import BitplanError
from ..io import atomic_path
from .schema import OBJECTIVES, LayerRecord, Profile

# Formats whose predicted round-to-nearest ΔKL gets a column when they are among the candidates.
REFERENCE_FORMATS = ("int4-g128", "int3-g128", "higgs-p2-n256-g128", "higgs-p2-n64-g128", "higgs-p2-n16-g128")

# sensitivity.csv, in this order (docs/sensitivity-csv.md has each column's unit and meaning). First what a reviewer
# acts on: the layer, the coefficient `solve` spends the bits by (which one, and the gain behind it), and the two
# independent measurements beside it; then every other figure of the profile, then `dkl_<format>`.
# trace_h_in_outer only on the embedding's and head's rows: for a block linear tr H_I = tr H_O = Σ_c ‖G_c‖² (an identity;
# the stored traces agree to float32 rounding).
LEAD = ["name", "block", "kind", "out_features", "in_features", "params", "alpha_solver", "alpha_solver_name",
        "alpha_solver_gain", "alpha_noise", "alpha_noise_r2", "alpha_hessian"]
REST = ["weight_sq_norm", "trace_h", "alpha_shaped", "alpha_yaqa", "yaqa_gain", "alpha_yaqa_heldout",
        "yaqa_gain_heldout", "yaqa_gain_heldout_raw", "ldlq_gain_heldout", "alpha_ldlq_heldout", "shrink_out",
        "shrink_in", "alpha_shaped_judge", "yaqa_gain_judged", "yaqa_gain_judged_raw", "ldlq_gain_judged",
        "alpha_yaqa_judged", "alpha_ldlq_judged", "trace_h_in_outer", "ties", "notes"]
COLUMNS = LEAD + REST
JUDGED = ("alpha_shaped_judge", "yaqa_gain_judged", "yaqa_gain_judged_raw", "ldlq_gain_judged")

# Where each forecast's gains are: judged on the other calibration half (cross-fitted), or on the model's own
# samples (profile/judge.py, with --judge-samples), whose own α_shaped then weighs the layers.
FORECAST_GAINS = {
    "halves": {"ldlq": "ldlq_gain_heldout", "yaqa raw": "yaqa_gain_heldout_raw", "yaqa auto": "yaqa_gain_heldout"},
    "samples": {"ldlq": "ldlq_gain_judged", "yaqa raw": "yaqa_gain_judged_raw", "yaqa auto": "yaqa_gain_judged"},
}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def alpha_shaped(r) -> float | None:
    """The layer's α at the scale adaptive rounding's errors see (coefficients.py); α_hessian in older profiles."""
    return r.extra.get("alpha_shaped", r.alpha_hessian)


def default_objective(profile: Profile) -> str:
    """The objective `solve` takes without --objective: the first of OBJECTIVES (yaqa, yaqa-halves, hessian, noise,
    ldlq) that has a coefficient for every layer."""
    for name, keys in OBJECTIVES.items():
        if all(any(getattr(r, k) is not None for k in keys) for r in profile.layers):
            return name
    raise BitplanError("the profile has no sensitivity coefficient present for every layer "
                       "(alpha_yaqa_judged, alpha_yaqa_heldout, alpha_yaqa, alpha_hessian or alpha_noise); "
                       "re-run `bitplan profile`")


def coefficient_gain(r: LayerRecord, coefficient: str) -> float | None:
    """The gain behind an adaptive rounding's coefficient: the coefficient ÷ the α_shaped it multiplies (the
    judge's own α_shaped for the judged ones), i.e. the share of round-to-nearest's ΔKL at that scale the rounding
    keeps; None for round-to-nearest's own coefficients (alpha_hessian, alpha_noise)."""
    gains = {"alpha_yaqa_judged": "yaqa_gain_judged", "alpha_ldlq_judged": "ldlq_gain_judged",
             "alpha_ldlq_heldout": "ldlq_gain_heldout"}
    if coefficient in gains:
        return r.extra.get(gains[coefficient])
    if coefficient in ("alpha_yaqa_heldout", "alpha_yaqa"):
        return _ratio(getattr(r, coefficient), alpha_shaped(r))
    return None


def sensitivity_frame(profile: Profile):
    """One row per layer in COLUMNS' order, then dkl_<format> = alpha_hessian × rel_err(format): the predicted
    mean per-token ΔKL of quantizing that layer alone to the format by round-to-nearest (REFERENCE_FORMATS that are
    among the candidates; not what `solve` uses)."""
    import pandas as pd

    refs = [f for f in REFERENCE_FORMATS if f in profile.formats]
    objective = default_objective(profile) if profile.layers else None
    rows = []
    for r in profile.plannable:
        shaped = alpha_shaped(r)
        used = r.coefficient(objective)
        row = {"name": r.name, "block": r.block, "kind": r.kind, "out_features": r.shape[0],
               "in_features": r.shape[1], "params": r.params,
               "alpha_solver": r.alpha(objective), "alpha_solver_name": used,
               "alpha_solver_gain": coefficient_gain(r, used),
               "alpha_noise": r.alpha_noise, "alpha_noise_r2": r.alpha_noise_r2, "alpha_hessian": r.alpha_hessian,
               "weight_sq_norm": r.weight_sq_norm, "trace_h": r.trace_h_out,
               "alpha_shaped": shaped, "alpha_yaqa": r.alpha_yaqa, "yaqa_gain": _ratio(r.alpha_yaqa, shaped),
               "alpha_yaqa_heldout": r.alpha_yaqa_heldout,
               "yaqa_gain_heldout": _ratio(r.alpha_yaqa_heldout, shaped),
               "alpha_ldlq_heldout": r.alpha_ldlq_heldout, "alpha_yaqa_judged": r.alpha_yaqa_judged,
               "alpha_ldlq_judged": r.alpha_ldlq_judged,
               **{k: r.extra.get(k) for k in ("shrink_out", "shrink_in", "yaqa_gain_heldout_raw",
                                              "ldlq_gain_heldout", *JUDGED)},
               "trace_h_in_outer": r.trace_h_in if r.outer else None, "ties": " ".join(r.ties) or None,
               "notes": OUTER_NOTES[r.kind] if r.outer else None}
        if r.outer:
            row["alpha_shaped"] = None   # no factors, no adaptive rounding: round-to-nearest's α only
        for f in refs:
            t2 = r.rel_err.get(f)
            row[f"dkl_{f}"] = None if t2 is None or r.alpha_hessian is None else r.alpha_hessian * t2
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS + [f"dkl_{f}" for f in refs])


# What the embedding's and head's rows measure, and what they lack (docs/sensitivity-csv.md).
OUTER_NOTES = {
    "embedding": "every objective takes its RTN alpha (an upper bound where apply uses LDLQ); alpha_hessian from whole-window "
                 "gradients of the matrix (both roles if tied); trace_h_in_outer = tokens (rows weighted by token count), "
                 "trace_h = sum of squared gradients at the embedding output; no YAQA/LDLQ figures",
    "head": "no two-sided factors kept: every objective takes its RTN alpha (an upper bound where apply uses LDLQ); trace_h_in_outer = sum |x|^2 of the final "
            "hidden states, trace_h = sum of squared logit gradients; no YAQA/LDLQ figures",
}


def forecast_kl(profile: Profile, fmt: str, rounding: str, judge: str = "halves") -> float | None:
    """Σ_l α_l · t²_l(fmt) · gain_l: the profile's forecast of the mean KL with `fmt` on every layer, rounded by
    `rounding` (rtn, ldlq, yaqa raw, yaqa auto), judged on the other calibration half or on the model's samples.
    α is α_hessian for round-to-nearest, α_shaped for the adaptive roundings (coefficients.py). None when a layer
    lacks a figure (no judge, or the format not measured)."""
    if judge not in FORECAST_GAINS:
        raise ValueError(f"judge must be one of {', '.join(FORECAST_GAINS)}, got {judge!r}")
    total = 0.0
    for r in profile.layers:
        if rounding == "rtn":
            gain, alpha = 1.0, r.alpha_hessian if judge == "halves" else None
        else:
            gain = r.extra.get(FORECAST_GAINS[judge][rounding])
            alpha = alpha_shaped(r) if judge == "halves" else r.extra.get("alpha_shaped_judge")
        if gain is None or alpha is None or fmt not in r.rel_err:
            return None
        total += alpha * r.rel_err[fmt] * gain
    return total


def forecast_ratios(profile: Profile, fmt: str, judge: str = "halves") -> dict[str, float] | None:
    """YAQA raw ÷ LDLQ and YAQA auto ÷ LDLQ forecast with `fmt` on every layer (None without the figures)."""
    kl = {v: forecast_kl(profile, fmt, v, judge) for v in ("ldlq", "yaqa raw", "yaqa auto")}
    if any(x is None for x in kl.values()) or not kl["ldlq"]:
        return None
    return {v: kl[v] / kl["ldlq"] for v in ("yaqa raw", "yaqa auto")}


def write_csv(profile: Profile, path: str | Path):
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


def solver_coefficient(profile: Profile, objective: str = "yaqa") -> str | None:
    """The coefficient `solve --objective OBJECTIVE` spends the bits by on this profile (the one the first layer
    has; `LayerRecord.coefficient`), or None when the profile has none of the objective's coefficients."""
    try:
        return profile.layers[0].coefficient(objective) if profile.layers else None
    except BitplanError:
        return None


# Per YAQA coefficient: its column header, what its gain multiplies, and where it was judged (tables, summary).
COEFFICIENT_LABELS = {
    "alpha_yaqa_judged": ("α_yaqa_judged", "judged on the model's own samples (apply --shrink auto's fit)"),
    "alpha_yaqa_heldout": ("α_yaqa_ho", "held-out (LDL on one calibration half, judged on the other)"),
    "alpha_yaqa": ("α_yaqa", "in-sample (fitted and judged on the same calibration)"),
}


def summary_line(profile: Profile) -> str:
    L = profile.layers
    rho = spearman([r.alpha_hessian for r in L], [r.alpha_noise for r in L])
    parts = [f"{len(L)} layers", f"{profile.calibration.get('tokens', '?')} calibration tokens"]
    if rho is not None:
        parts.append(f"Spearman(α_hessian, α_noise) = {rho:.3f}")
    medians = []
    for key in ("alpha_yaqa_judged", "alpha_yaqa_heldout"):
        gains = sorted(g for g in (coefficient_gain(r, key) for r in L) if g is not None)
        if gains:
            medians.append(f"{gains[len(gains) // 2]:.3f} {COEFFICIENT_LABELS[key][1].split(' (')[0]}")
    if medians:
        parts.append("median YAQA gain " + ", ".join(medians))
    coefficient = solver_coefficient(profile)
    if coefficient:
        parts.append(f"solve --objective yaqa spends the bits by {coefficient}")
    for r in profile.outer_layers:
        if r.alpha_noise is not None and r.alpha_hessian:
            parts.append(f"{r.kind} α_noise ÷ α_hessian = {r.alpha_noise / r.alpha_hessian:.3f}"
                         + (f" (tied: {', '.join(r.ties)})" if r.ties else ""))
    ref = next((f for f in REFERENCE_FORMATS if f in profile.formats), None)
    for judge, where in (("halves", "the other calibration half"), ("samples", "the model's own samples")):
        ratios = forecast_ratios(profile, ref, judge) if ref else None
        if ratios:
            parts.append(f"forecast ÷ LDLQ with {ref} everywhere, judged on {where}: YAQA raw "
                         f"{ratios['yaqa raw']:.3f}, auto {ratios['yaqa auto']:.3f}")
    return ", ".join(parts)


def short_name(name: str) -> str:
    """`model.layers.3.mlp.down_proj` → `3.mlp.down`, `…self_attn.q_proj` → `3.attn.q`: tables fit 80 columns."""
    name = re.sub(r"^.*?\blayers\.(\d+)\.", r"\1.", name)
    return name.replace("self_attn.", "attn.").removesuffix("_proj")


def sensitivity_table(profile: Profile, top: int = 8) -> Table:
    """The most and the least sensitive layers by the coefficient `solve` spends the bits by (α_hessian when the
    profile has no YAQA coefficient), with α_hessian, α_noise and that coefficient's gain alongside."""
    coefficient = solver_coefficient(profile)
    key = (lambda r: getattr(r, coefficient) or 0.0) if coefficient else (lambda r: r.alpha_hessian)
    ranked = sorted((r for r in profile.layers if r.alpha_hessian is not None), key=lambda r: -key(r))
    label, where = COEFFICIENT_LABELS.get(coefficient, ("", ""))
    table = Table(title="Most and least sensitive layers (mean per-token ΔKL per unit t²), by "
                        + (f"{label}: what `solve` spends the bits by" if coefficient else "α_hessian"))
    table.add_column("layer", no_wrap=True)
    columns = ["α_hessian", "α_noise", "R²"] + ([label, "gain"] if coefficient else [])
    for col in columns:
        table.add_column(col, justify="right", no_wrap=True)
    if coefficient:
        table.caption = (f"{label}: after two-sided LDLQ, {where}; gain: {label} ÷ the α_shaped it multiplies "
                         "(round-to-nearest's at the same scale)")

    def fmt(x: float | None, spec: str = ".3g") -> str:
        return "–" if x is None else format(x, spec)

    def add(r) -> None:
        cells = [fmt(r.alpha_hessian), fmt(r.alpha_noise), fmt(r.alpha_noise_r2, ".3f")]
        if coefficient:
            cells += [fmt(getattr(r, coefficient)), fmt(coefficient_gain(r, coefficient), ".3f")]
        table.add_row(short_name(r.name), *cells)

    head = ranked[:top]
    tail = ranked[max(top, len(ranked) - top):]
    for r in head:
        add(r)
    if tail:
        table.add_section()
        for r in tail:
            add(r)
    return table
