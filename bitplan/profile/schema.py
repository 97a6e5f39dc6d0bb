"""profile.json: the records `bitplan profile` writes and `bitplan solve` reads.

A profile is budget-independent: per block linear layer it holds the layer's shape and the sensitivity
coefficients, and per candidate format the layer's measured relative error t² = ‖W − Ŵ‖²/‖W‖² after rotation.
The solver's cost of giving layer l format f is `alpha_l(objective) * rel_err_l(f)`.

`outer_layers` holds the same records for the weights outside the decoder blocks that a plan can quantize: the
token embedding (kind "embedding", block -1) and an untied output head (kind "head", block = number of blocks).
A head tied to the embedding is no record of its own: the embedding's record lists it in `ties`, and its
coefficients measure both roles at once (the one matrix is rounded once). Profiles written before these records
have no `outer_layers`; their embedding and head stay fp16 extras.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BitplanError
from ..io import read_json, write_json
from ..models import ExtraTensor

SCHEMA = "bitplan.profile"
VERSION = 1

# The coefficient each solver objective uses: the first of its keys the profile has. Held-out variants come first;
# "yaqa" prefers the judge's (the model's own samples) to the calibration halves': its plans measured lower KL on
# WikiText (README, "Which coefficient the solver spends the bits by").
OBJECTIVES = {
    "yaqa": ("alpha_yaqa_judged", "alpha_yaqa_heldout", "alpha_yaqa"),
    "yaqa-halves": ("alpha_yaqa_heldout", "alpha_yaqa"),
    "hessian": ("alpha_hessian",),
    "noise": ("alpha_noise",),
    # one-sided LDLQ's (H_I = Σxxᵀ) forecast, for plans rounded with `apply --rounding ldlq`; never a default
    "ldlq": ("alpha_ldlq_judged", "alpha_ldlq_heldout"),
}

# Kinds of the records outside the decoder blocks (`Profile.outer_layers`).
OUTER_KINDS = ("embedding", "head")
# Their coefficient under each objective. No profile measures an adaptive rounding's gain on these matrices (apply
# rounds a tied embedding and an untied head with one-sided LDLQ under E[hhᵀ] where the profile holds it, an untied
# embedding to nearest), so every objective takes their round-to-nearest α, an upper bound for LDLQ: the measured
# α_noise, or α_hessian under `hessian` (each the other's stand-in).
OUTER_OBJECTIVES = {objective: ("alpha_hessian", "alpha_noise") if objective == "hessian"
                    else ("alpha_noise", "alpha_hessian") for objective in OBJECTIVES}


@dataclass
class LayerRecord:
    name: str                      # module path, e.g. "model.layers.3.mlp.down_proj"
    block: int                     # decoder block index
    kind: str                      # projection kind, e.g. "q_proj", "down_proj"
    shape: tuple[int, int]         # (out_features m, in_features n)
    weight_sq_norm: float          # ‖W‖²_F
    trace_h_in: float | None = None
    trace_h_out: float | None = None
    alpha_noise: float | None = None       # ΔKL per unit t², measured by noise injection
    alpha_noise_r2: float | None = None    # R² of the line through the origin
    alpha_hessian: float | None = None     # predicted, round-to-nearest
    alpha_yaqa: float | None = None        # predicted after two-sided LDLQ, in-sample
    alpha_yaqa_heldout: float | None = None  # predicted after two-sided LDLQ, cross-fitted
    rel_err: dict[str, float] = field(default_factory=dict)  # format name -> measured t² after rotation
    extra: dict[str, Any] = field(default_factory=dict)
    ties: list[str] = field(default_factory=list)  # other modules sharing this tensor (a tied head: ["lm_head"])

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def outer(self) -> bool:
        """An embedding or head record (outside the decoder blocks)."""
        return self.kind in OUTER_KINDS

    def keys(self, objective: str) -> tuple[str, ...]:
        """The coefficients `objective` may take for this record, in order of preference."""
        return OUTER_OBJECTIVES[objective] if self.outer else OBJECTIVES[objective]

    @property
    def alpha_yaqa_judged(self) -> float | None:
        """α after two-sided LDLQ (`apply --shrink auto`'s fit) judged under the model's own samples: the judge's
        α_shaped × its gain; None without a judge."""
        return self._extra_product("alpha_shaped_judge", "yaqa_gain_judged")

    @property
    def alpha_ldlq_judged(self) -> float | None:
        """α after one-sided LDLQ (H_I = Σxxᵀ of both halves) judged under the model's own samples."""
        return self._extra_product("alpha_shaped_judge", "ldlq_gain_judged")

    @property
    def alpha_ldlq_heldout(self) -> float | None:
        """α after one-sided LDLQ, cross-fitted between the calibration halves: α_shaped × the held-out gain."""
        return self._extra_product("alpha_shaped", "ldlq_gain_heldout")

    def _extra_product(self, alpha: str, gain: str) -> float | None:
        """extra[alpha] × extra[gain]: an α_shaped times the gain a rounding was judged to keep; None if either
        is missing."""
        a, g = self.extra.get(alpha), self.extra.get(gain)
        return None if a is None or g is None else float(a) * float(g)

    def coefficient(self, objective: str) -> str:
        """The name of the coefficient `alpha(objective)` is for this layer: the first of the objective's keys it
        has, or a clear error naming what the profile lacks."""
        if objective not in OBJECTIVES:
            raise BitplanError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        key = next((k for k in self.keys(objective) if getattr(self, k) is not None), None)
        if key is None:
            raise BitplanError(f"profile has no {' or '.join(self.keys(objective))} for layer {self.name}; "
                               "re-run `bitplan profile` with that measurement, or pick another --objective")
        return key

    def alpha(self, objective: str) -> float:
        """The coefficient for `objective` (see `coefficient`)."""
        # a slightly negative fit is noise: no layer improves by quantizing
        return max(float(getattr(self, self.coefficient(objective))), 0.0)


@dataclass
class Profile:
    model: dict[str, Any]          # {"id", "weights_sha256", "architecture", "n_params", ...}
    calibration: dict[str, Any]    # {"source", "samples", "seqlen", "seed", "tokens", ...}
    formats: list[str]             # candidate format names
    layers: list[LayerRecord]
    extras: list[ExtraTensor] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    version: int = VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # provenance: versions, timings, format table (optional)
    outer_layers: list[LayerRecord] = field(default_factory=list)  # the embedding and an untied head

    @property
    def plannable(self) -> list[LayerRecord]:
        """Every record a plan gives a format: the block linears, then the embedding and an untied head."""
        return self.layers + self.outer_layers

    def to_json(self) -> dict[str, Any]:
        out = {"schema": SCHEMA, "version": self.version, "model": self.model, "calibration": self.calibration,
               "settings": self.settings, "formats": self.formats,
               "layers": [_record_json(r) for r in self.layers], "extras": [asdict(e) for e in self.extras],
               **({"outer_layers": [_record_json(r) for r in self.outer_layers]} if self.outer_layers else {}),
               "extra": self.extra}
        for rec in out["extras"]:
            rec["shape"] = list(rec["shape"])
        return out

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_json())


def _record_json(r: LayerRecord) -> dict[str, Any]:
    out = asdict(r)
    out["shape"] = list(out["shape"])
    if not out["ties"]:
        del out["ties"]
    return out


def profile_path(path: str | Path) -> Path:
    """Accept a profile directory or the profile.json inside it."""
    path = Path(path)
    return path / "profile.json" if path.is_dir() else path


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile.json; every defect is a one-line BitplanError."""
    file = profile_path(path)
    if not file.exists():
        raise BitplanError(f"no profile at {path} (expected a profile directory or its profile.json)")
    data = read_json(file, "profile")
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise BitplanError(f"{file} is not a bitplan profile (missing \"schema\": \"{SCHEMA}\")")
    if data.get("version") != VERSION:
        raise BitplanError(f"{file} has profile version {data.get('version')}; this bitplan reads version {VERSION}")
    try:
        layers = [_layer(r) for r in data["layers"]]
        outer = [_layer(r) for r in data.get("outer_layers", [])]
        if any(not r.outer for r in outer) or any(r.outer for r in layers):
            raise ValueError(f"outer_layers holds kinds {', '.join(OUTER_KINDS)} only, and layers none of them")
        extras = [ExtraTensor(name=e["name"], kind=e["kind"], shape=tuple(int(x) for x in e["shape"]),
                              tied_to=e.get("tied_to")) for e in data.get("extras", [])]
        profile = Profile(model=dict(data["model"]), calibration=dict(data.get("calibration", {})),
                          formats=[str(f) for f in data["formats"]], layers=layers, extras=extras,
                          settings=dict(data.get("settings", {})), extra=dict(data.get("extra", {})),
                          outer_layers=outer)
    except (KeyError, TypeError, ValueError) as e:
        raise BitplanError(f"{file} is malformed: {type(e).__name__}: {e}") from None
    if not profile.layers:
        raise BitplanError(f"{file} lists no layers")
    names = [r.name for r in profile.plannable]
    if len(set(names)) != len(names):
        raise BitplanError(f"{file} lists a layer twice")
    return profile


def _layer(r: dict[str, Any]) -> LayerRecord:
    shape = tuple(int(x) for x in r["shape"])
    if len(shape) != 2 or min(shape) <= 0:
        raise ValueError(f"layer {r.get('name')} has shape {r['shape']}")
    rec = LayerRecord(name=str(r["name"]), block=int(r["block"]), kind=str(r["kind"]), shape=shape,
                      weight_sq_norm=float(r["weight_sq_norm"]),
                      rel_err={str(k): float(v) for k, v in r.get("rel_err", {}).items()},
                      extra=dict(r.get("extra", {})), ties=[str(t) for t in r.get("ties", [])])
    for key in ("trace_h_in", "trace_h_out", "alpha_noise", "alpha_noise_r2", "alpha_hessian",
                "alpha_yaqa", "alpha_yaqa_heldout"):
        value = r.get(key)
        if value is not None:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"layer {rec.name} has {key} = {value}")
        setattr(rec, key, value)
    return rec
