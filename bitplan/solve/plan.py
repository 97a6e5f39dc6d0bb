"""plan.json: the per-layer formats `bitplan solve` chose, with the accounting behind them.

A person may edit a plan (change a layer's "format"); `load_plan` re-checks it: every format must exist, every
layer of the profile must be there, and storage, predicted ΔKL and totals are recomputed from the formats so an
edited plan never carries stale numbers. A plan solved for a runtime (`"runtime": "vllm"`) must still be one the
runtime runs (`bitplan.solve.runtime`).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import BitplanError
from ..formats import Format, get_format
from ..formats.runtimes import RUNTIMES
from ..io import read_json, write_text
from ..profile.hessians import HESSIAN_DIR
from ..profile.schema import OUTER_KINDS, Profile, load_profile, profile_path
from .accounting import codebook_key, extras_account
from .problem import applicable, coefficient_name, layer_cost
from .runtime import check_plan_runtime

SCHEMA = "bitplan.plan"
VERSION = 1

# The rounding each objective's predicted ΔKL is for: what `apply` rounds a plan with unless told otherwise.
ROUNDING_OF = {"yaqa": "yaqa", "yaqa-halves": "yaqa", "ldlq": "ldlq", "hessian": "rtn", "noise": "rtn"}
ROUNDINGS = ("yaqa", "ldlq", "rtn")


def rounding_for(objective: str) -> str:
    """The rounding a plan solved with `objective` is for: yaqa and yaqa-halves → yaqa (two-sided LDLQ), ldlq →
    ldlq (one-sided), hessian and noise → rtn (their α is round-to-nearest's)."""
    if objective not in ROUNDING_OF:
        raise BitplanError(f"unknown objective {objective!r}; choose one of {', '.join(ROUNDING_OF)}")
    return ROUNDING_OF[objective]


@dataclass
class LayerPlan:
    """One planned tensor: a block linear, or the token embedding (kind "embedding", block -1, named by its module
    path, e.g. model.embed_tokens) or an untied head (kind "head", block = number of blocks, e.g. lm_head). A head
    tied to the embedding is no entry of its own: the embedding's `ties` names it, and the one tensor's storage is
    counted once."""
    name: str
    format: str
    block: int
    kind: str
    shape: tuple[int, int]
    storage_bits: int
    predicted_dkl: float | None      # None when an edited plan is re-checked without its profile
    ties: list[str] = field(default_factory=list)   # modules sharing this tensor (a tied head)

    @property
    def outer(self) -> bool:
        return self.kind in OUTER_KINDS

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def bpw(self) -> float:
        return self.storage_bits / self.params

    def to_json(self) -> dict:
        return {"name": self.name, "format": self.format, "block": self.block, "kind": self.kind,
                "shape": list(self.shape), "storage_bits": self.storage_bits, "bpw": round(self.bpw, 6),
                "predicted_dkl": self.predicted_dkl, **({"ties": list(self.ties)} if self.ties else {})}


@dataclass
class Plan:
    profile: dict                    # {"path", "sha256", "model"}
    budget: dict                     # {"given", "kind", "value", "bits", "layer_bits", "resolved"}
    solver: dict                     # {"name", "optimal", "seconds", ...}
    objective: str
    constraints: dict
    layers: list[LayerPlan]
    extras: dict                     # how embeddings/head/other tensors are stored and counted
    codebooks: list[dict] = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    uniform: dict | None = None      # the best single format at the same budget
    coefficient: str | None = None   # what the objective took in the profile, e.g. alpha_yaqa_judged
    created_by: str = f"bitplan {__version__}"
    rounding: str | None = None      # yaqa, ldlq or rtn; None: the objective's (`rounding_for`)
    scope: str = "blocks"            # all: the embedding and head are chosen too; blocks: they stay fp16 unless pinned
    runtime: str = "any"             # any: bitplan's own loader; vllm: only what vLLM runs (bitplan.solve.runtime)

    def __post_init__(self) -> None:
        if self.rounding is None:
            self.rounding = rounding_for(self.objective)
        if not self.totals:
            self.refresh_totals()

    def refresh_totals(self) -> None:
        """Codebooks and totals from the layers' formats (used after solving and after an edit)."""
        fmts = {lp.format: get_format(lp.format) for lp in self.layers}
        books: dict[str, dict] = {}
        for name, f in fmts.items():
            key = codebook_key(f)
            if key is not None:
                entry = books.setdefault(key, {"grid": key, "bits": 0, "formats": []})
                entry["bits"] = max(entry["bits"], int(f.codebook_bits))
                entry["formats"].append(name)
        self.codebooks = sorted(books.values(), key=lambda b: b["grid"])
        self.totals = plan_totals(self.layers, fmts, sum(b["bits"] for b in self.codebooks), self.extras["bits"],
                                  self.budget)

    @property
    def formats(self) -> dict[str, str]:
        return {lp.name: lp.format for lp in self.layers}

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "version": VERSION, "created_by": self.created_by, "profile": self.profile,
                "budget": self.budget, "solver": self.solver, "objective": self.objective,
                "rounding": self.rounding, "coefficient": self.coefficient, "scope": self.scope,
                "runtime": self.runtime, "constraints": self.constraints, "totals": self.totals, "uniform": self.uniform,
                "extras": self.extras, "codebooks": self.codebooks,
                "layers": [lp.to_json() for lp in self.layers]}

    def save(self, path: str | Path) -> None:
        write_text(path, plan_text(_finite(self.to_json())))


def plan_text(obj: Any, indent: int = 2, width: int = 100) -> str:
    """JSON for people: a list of records (the layers, the codebooks) one record a line, a list of numbers or
    names on one line, any other container that fits `width` on one line; json.loads reads back the same values."""
    def encode(o: Any, level: int) -> str:
        flat = json.dumps(o, ensure_ascii=False)
        if not isinstance(o, (dict, list)) or not o or len(flat) + indent * level <= width or \
                (isinstance(o, list) and not any(isinstance(x, (dict, list)) for x in o)):
            return flat
        pad, end = " " * (indent * (level + 1)), " " * (indent * level)
        if isinstance(o, list):
            records = all(isinstance(x, dict) for x in o)
            items = [json.dumps(x, ensure_ascii=False) if records else encode(x, level + 1) for x in o]
            return "[\n" + ",\n".join(pad + item for item in items) + "\n" + end + "]"
        items = [f"{json.dumps(str(k), ensure_ascii=False)}: {encode(v, level + 1)}" for k, v in o.items()]
        return "{\n" + ",\n".join(pad + item for item in items) + "\n" + end + "}"

    return encode(obj, 0) + "\n"


def optimality(solver: dict) -> dict:
    """What the solver proved, in words beside its numbers: `optimal` is true only for a proven optimum, and
    false says only that the proof is missing; the Lagrangian lower bound (the DP's) caps how far off it can be."""
    gap = solver.get("gap_to_lower_bound")
    if solver.get("optimal"):
        return {"proven_gap": 0.0, "meaning": "proven optimal: no plan within the budget and constraints predicts "
                                              "a lower ΔKL"}
    if gap is not None:
        return {"proven_gap": gap,
                "meaning": "not proven optimal, but proven close: no plan within the budget and constraints "
                           "predicts less ΔKL than lower_bound = (1 − proven_gap) × this plan's (the DP solves on "
                           "cells of `quantum` bits with codebook bits reserved, and proves this bound on the exact "
                           "problem)"}
    return {"proven_gap": None, "meaning": f"not proven optimal ({solver.get('status', 'no bound recorded')})"}


def with_optimality(solver: dict) -> dict:
    """`solver` with "optimality" right after "optimal"."""
    out = {}
    for key, value in solver.items():
        if key != "optimality":
            out[key] = value
        if key == "optimal":
            out["optimality"] = optimality(solver)
    return out


def profile_folder(plan: Plan) -> Path | None:
    """The folder of the profile the plan was solved from, if it is recorded and still there."""
    recorded = (plan.profile or {}).get("path")
    if not recorded or not profile_path(recorded).is_file():
        return None
    return profile_path(recorded).parent


def rounding_note(plan: Plan) -> str | None:
    """One line when the plan's rounding needs what its profile folder lacks: YAQA and LDLQ round with the
    profile's Hessian factors (hessians/), which a shipped profile leaves out; None when it has them, when the plan
    rounds to nearest, or when the profile is not on disk."""
    folder = profile_folder(plan)
    if plan.rounding == "rtn" or folder is None or (folder / HESSIAN_DIR).is_dir():
        return None
    return (f"a plan solved with --objective {plan.objective} is for {plan.rounding} rounding, which needs the "
            f"Hessian factors ({HESSIAN_DIR}/) that "
            f"{folder} lacks: profile the model yourself (`bitplan profile`) and solve from that folder, or solve "
            "with --objective hessian for `bitplan apply --rounding rtn`")


def plan_totals(layers: list[LayerPlan], fmts: dict[str, Format], codebook_bits: int, extras_bits: int,
                budget: dict) -> dict:
    """nominal/storage bpw over the block linears (codebooks included), `planned_bpw` over every plan layer (the
    embedding and an untied head too, a tied matrix once); layer_bits: every plan layer's storage."""
    blocks = [lp for lp in layers if not lp.outer]
    weights = sum(lp.params for lp in blocks)
    block_storage = sum(lp.storage_bits for lp in blocks)
    storage = sum(lp.storage_bits for lp in layers)
    planned = sum(lp.params for lp in layers)
    nominal = sum(fmts[lp.format].nominal_bits * lp.params for lp in blocks)
    dkl = [lp.predicted_dkl for lp in layers]
    total_bits = storage + codebook_bits + extras_bits
    out = {"block_weights": weights, "nominal_bpw": nominal / weights,
           "storage_bpw": (block_storage + codebook_bits) / weights,
           "storage_bpw_without_codebooks": block_storage / weights,
           "planned_weights": planned, "planned_bpw": (storage + codebook_bits) / planned,
           "outer_bits": storage - block_storage,
           "layer_bits": storage, "codebook_bits": codebook_bits, "extras_bits": extras_bits,
           "total_bits": total_bits, "total_bytes": math.ceil(total_bits / 8),
           "predicted_dkl": None if any(d is None for d in dkl) else float(sum(dkl))}
    if budget.get("layer_bits") is not None:
        out["within_budget"] = storage + codebook_bits <= budget["layer_bits"]
    return out


def _finite(obj):
    """JSON has no inf/nan: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def profile_identity(profile: Profile, path: str | Path | None) -> dict:
    """Where the plan came from: the profile file and its sha256 (of the JSON it would write, if in memory)."""
    if path is not None:
        file = profile_path(path)
        return {"path": str(file), "sha256": file_sha256(file), "model": profile.model}
    text = json.dumps(profile.to_json(), indent=2) + "\n"
    return {"path": None, "sha256": hashlib.sha256(text.encode()).hexdigest(), "model": profile.model}


def load_plan(path: str | Path, profile: Profile | str | Path | None = None) -> Plan:
    """Read and re-check a plan.json, possibly edited by hand; every defect is a one-line BitplanError.

    The profile (given, or the one the plan names if it is still on disk) supplies the layer list to check
    against and the coefficients to recompute predicted ΔKL; without it the recorded values are kept for
    unedited layers and dropped for edited ones."""
    path = Path(path)
    data = read_json(path, "plan")
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise BitplanError(f"{path} is not a bitplan plan (missing \"schema\": \"{SCHEMA}\")")
    if data.get("version") != VERSION:
        raise BitplanError(f"{path} has plan version {data.get('version')}; this bitplan reads version {VERSION}")
    for key in ("profile", "budget", "objective", "layers"):
        if key not in data:
            raise BitplanError(f"{path} is malformed: no \"{key}\"")
    if not isinstance(data["layers"], list) or not data["layers"]:
        raise BitplanError(f"{path} is malformed: \"layers\" must be a non-empty list")
    objective = str(data["objective"])
    if objective not in ROUNDING_OF:
        raise BitplanError(f"{path}: unknown objective {objective!r}; choose one of {', '.join(ROUNDING_OF)}")
    rounding = data.get("rounding")
    if rounding is None:  # plans written before the field: the objective decides
        rounding = rounding_for(objective)
    elif rounding not in ROUNDINGS:
        raise BitplanError(f"{path}: unknown rounding {rounding!r}; choose one of {', '.join(ROUNDINGS)}")

    if profile is None:
        recorded = (data.get("profile") or {}).get("path")
        if recorded and profile_path(recorded).exists():
            profile = recorded
    prof = load_profile(profile) if isinstance(profile, (str, Path)) else profile
    by_name = {r.name: r for r in prof.plannable} if prof is not None else {}

    layers: list[LayerPlan] = []
    seen: set[str] = set()
    for i, entry in enumerate(data["layers"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or \
                not isinstance(entry.get("format"), str):
            raise BitplanError(f"{path}: layer entry {i} needs string \"name\" and \"format\"")
        name = entry["name"]
        if name in seen:
            raise BitplanError(f"{path}: layer {name} appears twice")
        seen.add(name)
        try:
            fmt = get_format(entry["format"])
        except BitplanError as e:
            raise BitplanError(f"{path}: layer {name}: {e}") from None
        rec = by_name.get(name)
        if prof is not None and rec is None:
            raise BitplanError(f"{path}: layer {name} is not in the profile {prof.model.get('id', '')}".rstrip())
        try:
            shape = tuple(int(x) for x in (entry.get("shape") or rec.shape))
            block = int(entry.get("block", rec.block if rec else -1))
            kind = str(entry.get("kind", rec.kind if rec else ""))
        except (TypeError, ValueError, AttributeError):
            raise BitplanError(f"{path}: layer {name} needs a \"shape\" [out, in]") from None
        if len(shape) != 2 or min(shape) < 1:
            raise BitplanError(f"{path}: layer {name} has shape {list(shape)}; expected [out, in]")
        if rec is not None and tuple(rec.shape) != shape:
            raise BitplanError(f"{path}: layer {name} has shape {list(shape)} but the profile says {list(rec.shape)}")
        if not applicable(fmt, shape, rec):
            raise BitplanError(f"{path}: layer {name}: {fmt.name} cannot store a {shape[0]}×{shape[1]} matrix")
        ties = [str(t) for t in entry.get("ties", rec.ties if rec is not None else [])]
        bits = int(fmt.storage_bits(*shape))
        if rec is not None:
            dkl = layer_cost(rec, fmt, objective)
        elif entry.get("storage_bits") == bits and isinstance(entry.get("predicted_dkl"), (int, float)):
            dkl = float(entry["predicted_dkl"])
        else:
            dkl = None
        layers.append(LayerPlan(name=name, format=fmt.name, block=block, kind=kind, shape=shape,
                                storage_bits=bits, predicted_dkl=dkl, ties=ties))
    if prof is not None:
        missing = [r.name for r in prof.plannable if r.name not in seen]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise BitplanError(f"{path}: no format for layer {missing[0]}{more} of the profile")
    runtime = data.get("runtime", "any")   # plans written before the field: any
    if runtime not in RUNTIMES:
        raise BitplanError(f"{path}: unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    check_plan_runtime(layers, runtime, str(path))
    extras = data.get("extras")
    if prof is not None:
        extras = extras_account(prof).to_json()
    elif not isinstance(extras, dict) or not isinstance(extras.get("bits"), int):
        raise BitplanError(f"{path} is malformed: \"extras\" needs integer \"bits\"")
    budget = data["budget"] if isinstance(data["budget"], dict) else {}
    solver = dict(data.get("solver") or {})
    if "optimality" not in solver and "optimal" in solver:  # plans written before the field
        solver = with_optimality(solver)
    return Plan(profile=dict(data["profile"]), budget=budget, solver=solver,
                objective=objective, constraints=dict(data.get("constraints") or {}), layers=layers,
                extras=extras, uniform=data.get("uniform"), created_by=str(data.get("created_by", "")),
                rounding=rounding, scope=_scope(data, path), runtime=runtime,
                coefficient=coefficient_name(prof, objective) if prof is not None else data.get("coefficient"))


def _scope(data: dict, path: Path) -> str:
    """A plan's scope; plans written before the field planned the block linears only."""
    scope = data.get("scope", "blocks")
    if scope not in ("all", "blocks"):
        raise BitplanError(f"{path}: unknown scope {scope!r}; choose all or blocks")
    return scope
