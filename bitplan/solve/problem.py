"""From a profile and the user's constraints to the knapsack the solvers see.

Candidate formats, pins (`REGEX=FORMAT`), per-layer bounds on nominal bits and tie groups all shape the options
of each item; a tie group (layers that must share one format) becomes a single item whose option bits and costs
are the sums over its layers, which is exact and lets the DP handle ties as well as the ILP.

The items are the profile's block linears and, when it has their records (`Profile.outer_layers`), the token
embedding and an untied head. The scope says what a plan chooses for: `all` plans them like any layer; `blocks`
keeps them in fp16 (or their pinned format) outside the choice. A format a layer's shape rules out
(`Format.applicable`), or that its profile record lists as inapplicable, is never one of that layer's options.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BitplanError
from ..formats import (Format, all_formats, default_candidates, get_format, ggml_candidates, unsupported_reason,
                       vllm_candidates)
from ..formats.runtimes import check_runtime
from ..profile.report import default_objective
from ..profile.schema import OBJECTIVES, LayerRecord, Profile
from .accounting import ExtrasAccount, codebook_key, codebooks, extras_account
from .mckp import Problem
from .runtime import forced_ties

TIE_GROUPS = {
    "qkv": ("q", "k", "v"),
    "gateup": ("gate", "up"),
    "attn": ("q", "k", "v", "o"),
    "mlp": ("gate", "up", "down"),
    "block": None,  # every layer of a block
}
FORMAT_SETS = ("profile", "default", "all", "grid", "int", "kernel")
SCOPES = ("all", "blocks")


def applicable(fmt: Format, shape: tuple[int, int], record: LayerRecord | None = None) -> bool:
    """Whether `fmt` can store a layer of `shape`: the format says so (a K-type needs an input width that is a
    multiple of 256), and the profile did not record it as inapplicable to the layer."""
    if record is not None and fmt.name in record.extra.get("inapplicable_formats", ()):
        return False
    return bool(getattr(fmt, "applicable", lambda m, n: True)(*shape))


def resolve_scope(profile: Profile, scope: str | None, budget_kind: str, runtime: str = "any") -> str:
    """`all` (every planned weight, the embedding and an untied head included) or `blocks` (the block linears;
    the embedding and head stay fp16 unless pinned). Default: `all` for a byte budget, `blocks` for bpw; a profile
    without the embedding's records has only `blocks`, and `--scope all` on it says to remake it. A runtime other
    than `any` has only `blocks` (bitplan's compressed-tensors export writes the embedding and head in fp16)."""
    if check_runtime(runtime) != "any":
        if scope is not None and str(scope).lower() != "blocks":
            raise BitplanError(f"--runtime {runtime} plans the block linears only (--scope blocks): its "
                               "compressed-tensors export writes the token embedding and output head in fp16")
        return "blocks"
    if scope is not None:
        scope = str(scope).lower()
        if scope not in SCOPES:
            raise BitplanError(f"unknown scope {scope!r}; choose all or blocks")
        if scope == "all" and not profile.outer_layers:
            raise BitplanError("--scope all: this profile has no records of the token embedding and output head "
                               "(made before bitplan measured them), so it cannot plan them; remake it with "
                               "`bitplan profile` to plan them, or solve with --scope blocks (they stay fp16)")
        return scope
    return "all" if budget_kind == "bytes" and profile.outer_layers else "blocks"


def kind_family(kind: str) -> str:
    """`q_proj` → `q`, `gate_proj` → `gate`: the short names tie groups and reports use."""
    return kind.removesuffix("_proj")


def objective_for(profile: Profile, objective: str | None) -> str:
    """The requested objective, or the best one every layer has (`default_objective`): yaqa (the judge's
    coefficient, else the halves'), then hessian, then noise."""
    if objective is not None:
        if objective not in OBJECTIVES:
            raise BitplanError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        for layer in profile.plannable:
            layer.alpha(objective)  # a clear error naming the first layer without it
        return objective
    return default_objective(profile)


def coefficient_name(profile: Profile, objective: str) -> str:
    """The coefficient `objective` takes for the block linears in this profile, e.g. alpha_yaqa_judged (names
    joined by " / " in the objective's order if layers differ; the embedding and head take their RTN α, schema.py)."""
    keys = {r.coefficient(objective) for r in profile.layers}
    return " / ".join(k for k in OBJECTIVES[objective] if k in keys)


def resolve_formats(spec: str | list | tuple | None, profile: Profile) -> list[Format]:
    """Candidate formats from a comma list of names and named sets (profile, default, all, grid, int, kernel, ggml,
    vllm).

    None means the profile's own candidates (or the default set when it lists none). `grid`, `int` and `kernel`
    (formats with fast kernels: grids of p ≤ 2 and integer groups) select from the profile's and the default
    candidates and keep fp16 as the always-available fallback."""
    if spec is None:
        spec = "profile" if profile.formats else "default"
    tokens = [t for t in re.split(r"[,\s]+", spec) if t] if isinstance(spec, str) else [str(t) for t in spec]
    if not tokens:
        raise BitplanError("--formats names no format")
    try:
        listed = [get_format(n) for n in profile.formats]
    except BitplanError as e:
        raise BitplanError(f"the profile's candidate list: {e}") from None
    pool = _unique(listed + default_candidates())
    out: list[Format] = []
    for t in tokens:
        key = t.lower()
        if key == "profile":
            out += listed or default_candidates()
        elif key == "default":
            out += default_candidates()
        elif key == "ggml":
            out += ggml_candidates()
        elif key == "vllm":
            out += vllm_candidates()
        elif key == "all":
            out += all_formats()
        elif key in ("grid", "int"):
            out += [f for f in pool if f.kind in (key, "fp16")]
        elif key == "kernel":
            out += [f for f in pool if f.kind in ("int", "fp16") or (f.kind == "grid" and f.vector_dim <= 2)]
        else:
            out.append(get_format(t))
    return _unique(out)


def runtime_candidates(spec: str | list | tuple | None, profile: Profile, runtime: str) -> list[Format]:
    """`resolve_formats` for a runtime: None means the runtime's own menu (`vllm`); named sets are narrowed to
    what it runs, and a format named on its own that it cannot run is refused, saying why."""
    runtime = check_runtime(runtime)
    if runtime == "any":
        return resolve_formats(spec, profile)
    if spec is None:
        spec = runtime
    tokens = [t for t in re.split(r"[,\s]+", spec) if t] if isinstance(spec, str) else [str(t) for t in spec]
    for t in tokens:
        if t.lower() in FORMAT_SETS + ("ggml", "vllm", "profile"):
            continue
        reason = unsupported_reason(get_format(t), runtime)
        if reason:
            raise BitplanError(f"--formats {t}: --runtime {runtime} cannot run it: {reason}")
    given = resolve_formats(spec, profile)
    out = [f for f in given if unsupported_reason(f, runtime) is None]
    if not out or (all(f.kind == "fp16" for f in out) and any(f.kind != "fp16" for f in given)):
        raise BitplanError(f"--formats {','.join(tokens)} holds no quantized format {runtime} runs; "
                           f"leave --formats out for the {runtime} menu (`--formats {runtime}`)")
    return out


def _unique(formats: list[Format]) -> list[Format]:
    seen: dict[str, Format] = {}
    for f in formats:
        seen.setdefault(f.name, f)
    return list(seen.values())


def parse_pins(pins) -> list[tuple[str, Format]]:
    """`REGEX=FORMAT` strings (or (regex, format) pairs) → validated (regex, Format) pairs."""
    out = []
    for pin in pins or ():
        if isinstance(pin, str):
            regex, sep, name = pin.rpartition("=")
            if not sep or not regex or not name:
                raise BitplanError(f"--pin {pin!r}: write REGEX=FORMAT, e.g. 'mlp.down_proj=int4-g128'")
        else:
            regex, name = pin
        try:
            re.compile(regex)
        except re.error as e:
            raise BitplanError(f"--pin {regex}={name}: invalid regular expression ({e})") from None
        out.append((regex, get_format(name.strip())))
    return out


def parse_ties(tie) -> list[str]:
    if tie is None or tie == "" or tie == "none":
        return []
    names = [t.strip().lower() for t in (tie.split(",") if isinstance(tie, str) else tie) if t.strip()]
    for n in names:
        if n not in TIE_GROUPS:
            raise BitplanError(f"unknown tie group {n!r}; use a comma list of {', '.join(TIE_GROUPS)}")
    return _unique_str(names)


def _unique_str(xs):
    return list(dict.fromkeys(xs))


@dataclass
class Resource:
    """A second linear resource (e.g. latency): amount per weight of each format, and a limit on its mean per
    weight over the block linears (so a table in µs per weight takes a limit in µs per weight)."""
    name: str
    per_weight: dict[str, float]
    limit_per_weight: float
    source: str = ""

    def to_json(self) -> dict:
        return {"name": self.name, "source": self.source, "limit_per_weight": self.limit_per_weight,
                "per_weight": self.per_weight}


def load_resource(path: str | Path, limit: float | None = None) -> Resource:
    """A JSON file `{"name", "limit_per_weight", "per_weight": {format: value}}` or a CSV `format,per_weight`
    (the limit then comes from `limit`, which also overrides the file's)."""
    path = Path(path)
    if not path.is_file():
        raise BitplanError(f"resource table not found: {path}")
    name, file_limit = path.stem, None
    if path.suffix.lower() == ".json":
        from ..io import read_json

        data = read_json(path, "resource table")
        if not isinstance(data, dict) or not isinstance(data.get("per_weight"), dict):
            raise BitplanError(f"resource table {path} needs an object with \"per_weight\": {{format: value}}")
        table = data["per_weight"]
        name = str(data.get("name", name))
        file_limit = data.get("limit_per_weight")
    else:
        try:
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
        except (OSError, csv.Error, UnicodeDecodeError) as e:
            raise BitplanError(f"cannot read resource table {path}: {e}") from None
        if not rows or "format" not in rows[0] or len(rows[0]) < 2:
            raise BitplanError(f"resource table {path} needs a header `format,per_weight` and one row per format")
        column = "per_weight" if "per_weight" in rows[0] else [k for k in rows[0] if k != "format"][0]
        table = {r["format"]: r[column] for r in rows}
    per_weight = {}
    for fmt, value in table.items():
        get_format(fmt)
        try:
            per_weight[fmt] = float(value)
        except (TypeError, ValueError):
            raise BitplanError(f"resource table {path}: {fmt} has a non-numeric value {value!r}") from None
        if not math.isfinite(per_weight[fmt]) or per_weight[fmt] < 0:
            raise BitplanError(f"resource table {path}: {fmt} needs a finite non-negative value")
    limit = limit if limit is not None else file_limit
    if limit is None:
        raise BitplanError(f"resource {name}: give its limit (mean per weight) with --resource-limit or "
                           f"\"limit_per_weight\" in the JSON file")
    try:
        limit = float(limit)
    except (TypeError, ValueError):
        raise BitplanError(f"resource {name}: limit {limit!r} is not a number") from None
    return Resource(name=name, per_weight=per_weight, limit_per_weight=limit, source=str(path))


@dataclass
class Instance:
    """The profile turned into knapsack items, ready to be solved at any budget."""
    profile: Profile
    objective: str
    candidates: list[Format]             # after --formats and the min/max bits filter
    items: list[list[int]]               # layer indices per item (one layer, or a tie group)
    options: list[list[Format]]          # formats each item may take
    bits: list[np.ndarray]               # per item: storage bits of each option (summed over its layers)
    cost: list[np.ndarray]               # per item: predicted ΔKL of each option
    codebook: list[np.ndarray]           # per item: codebook id of each option (-1: none)
    codebook_names: list[str]
    codebook_bits: np.ndarray
    candidate_bits: np.ndarray           # layers × candidates: storage bits (for the uniform baseline)
    candidate_cost: np.ndarray           # layers × candidates: predicted ΔKL
    extras: ExtrasAccount
    block_weights: int
    constraints: dict
    resource: Resource | None = None
    resource_use: list[np.ndarray] | None = None
    _bits_cache: dict = field(default_factory=dict, repr=False)
    scope: str = "blocks"
    layers: list[LayerRecord] = field(default_factory=list)   # the records the items index: profile.plannable
    free: np.ndarray | None = None   # per layer: chosen by the plan (False: fixed outside the scope's budget)
    fixed_bits: int = 0              # storage of the layers outside the scope (bits a bpw budget does not cover)

    @property
    def budget_weights(self) -> int:
        """The weights a bpw budget is per: the block linears, or with scope `all` every planned weight (a tied
        matrix once)."""
        if self.scope == "blocks":
            return self.block_weights
        return sum(r.params for r in self.layers)

    def bpw_bits(self, bits: int) -> float:
        """A plan's bits (all its layers, codebooks) as bits per weight in the scope's sense."""
        return (bits - self.fixed_bits) / self.budget_weights

    def problem(self, budget_bits: int) -> Problem:
        limit = None
        if self.resource is not None:
            limit = self.resource.limit_per_weight * self.budget_weights
        return Problem(self.bits, self.cost, budget_bits, codebook=self.codebook, codebook_bits=self.codebook_bits,
                       resource=self.resource_use, resource_limit=limit)

    def layer_bits(self, layer: int, fmt: Format) -> int:
        return storage_bits(self._bits_cache, fmt, self.layers[layer].shape)

    def estimated(self) -> dict[str, int]:
        """Format → how many layers may take it at a t² the profile did not measure (the Gaussian mse_q
        stands in); fp16 is left out (its error is ~0 either way)."""
        out: dict[str, int] = {}
        for item, opts in zip(self.items, self.options):
            for fmt in opts:
                if fmt.kind == "fp16":
                    continue
                for i in item:
                    t2 = self.layers[i].rel_err.get(fmt.name)
                    if t2 is None or not math.isfinite(t2):
                        out[fmt.name] = out.get(fmt.name, 0) + 1
        return out

    def layer_cost(self, layer: int, fmt: Format) -> float:
        return layer_cost(self.layers[layer], fmt, self.objective)


def storage_bits(cache: dict, fmt: Format, shape: tuple[int, int]) -> int:
    key = (fmt.name, tuple(shape))
    if key not in cache:
        cache[key] = int(fmt.storage_bits(*shape))
    return cache[key]


def layer_cost(layer: LayerRecord, fmt: Format, objective: str) -> float:
    """Predicted ΔKL of giving `layer` format `fmt`: α(objective) × t², t² measured when the profile has it."""
    return layer.alpha(objective) * _t2(layer, fmt)


def _t2(layer: LayerRecord, fmt: Format) -> float:
    """The layer's measured relative error in `fmt`, else the format's Gaussian mse_q (fp16: ≈ 0)."""
    t2 = layer.rel_err.get(fmt.name)
    if t2 is None or not math.isfinite(t2):
        t2 = fmt.mse_q
    return max(float(t2), 0.0)


def build_instance(profile: Profile, objective: str | None = None, formats=None, pins=(),
                   min_bits: float | None = None, max_bits: float | None = None, tie=None,
                   resource: Resource | None = None, scope: str = "blocks", runtime: str = "any") -> Instance:
    """The knapsack of `profile` under these constraints; `scope` (`resolve_scope`) says whether the embedding
    and an untied head are chosen (`all`) or stay fp16 unless pinned (`blocks`). `runtime` (`vllm`) narrows the
    candidates to what it runs, ties the layers it fuses and keeps the embedding and head fp16."""
    runtime = check_runtime(runtime)
    objective = objective_for(profile, objective)
    scope = resolve_scope(profile, scope, "bpw", runtime)
    layers = profile.plannable
    free = np.array([scope == "all" or not r.outer for r in layers], dtype=bool)
    if min_bits is not None and max_bits is not None and min_bits > max_bits:
        raise BitplanError(f"--min-bits {min_bits:g} is above --max-bits {max_bits:g}")

    def in_bounds(f: Format) -> bool:
        return (min_bits is None or f.nominal_bits >= min_bits - 1e-9) and \
               (max_bits is None or f.nominal_bits <= max_bits + 1e-9)

    all_candidates = runtime_candidates(formats, profile, runtime)
    candidates = [f for f in all_candidates if in_bounds(f)]
    if not candidates:
        raise BitplanError(f"no candidate format has nominal bits within [{min_bits}, {max_bits}] "
                           f"(candidates span {min(f.nominal_bits for f in all_candidates):g}–"
                           f"{max(f.nominal_bits for f in all_candidates):g} bits)")

    pin_list = parse_pins(pins)
    pinned: dict[int, tuple[str, Format]] = {}
    for regex, fmt in pin_list:
        if not in_bounds(fmt):
            raise BitplanError(f"--pin {regex}={fmt.name}: {fmt.name} has {fmt.nominal_bits:g} nominal bits, "
                               f"outside --min-bits/--max-bits [{min_bits}, {max_bits}]")
        hits = [i for i, r in enumerate(layers) if re.search(regex, r.name)]
        if not hits:
            raise BitplanError(f"--pin {regex}={fmt.name} matches no layer (names look like {layers[0].name})")
        reason = unsupported_reason(fmt, runtime)
        if reason:
            raise BitplanError(f"--pin {regex}={fmt.name}: --runtime {runtime} cannot run it: {reason}")
        outer = next((layers[i] for i in hits if layers[i].outer), None)
        if runtime != "any" and outer is not None and fmt.kind != "fp16":
            raise BitplanError(f"--pin {regex}={fmt.name}: --runtime {runtime} keeps {outer.name} ({outer.kind}) "
                               "fp16; bitplan's compressed-tensors export writes the embedding and head in fp16")
        for i in hits:
            reason = unsupported_reason(fmt, runtime, layers[i].shape) if fmt.kind != "fp16" else None
            if reason:
                raise BitplanError(f"--pin {regex}={fmt.name}: --runtime {runtime} cannot run it on {layers[i].name}: "
                                   f"{reason}")
            if not applicable(fmt, layers[i].shape, layers[i]):
                raise BitplanError(f"--pin {regex}={fmt.name}: {fmt.name} cannot store {layers[i].name} "
                                   f"({layers[i].shape[0]}×{layers[i].shape[1]})")
            if i in pinned and pinned[i][1].name != fmt.name:
                raise BitplanError(f"layer {layers[i].name} is pinned twice: {pinned[i][0]}={pinned[i][1].name} and "
                                   f"{regex}={fmt.name}; make the patterns disjoint")
            pinned[i] = (regex, fmt)

    ties = _unique_str(parse_ties(tie) + forced_ties(runtime))
    groups = _tie_groups(layers, ties)

    cache: dict = {}
    cb_names = list(codebooks(candidates + [f for _, f in pin_list]))
    cb_bits = codebooks(candidates + [f for _, f in pin_list])
    cb_index = {k: i for i, k in enumerate(cb_names)}
    items, options, bits, cost, cbs, res = [], [], [], [], [], []
    if resource is not None:
        missing = [f.name for f in candidates + [p for _, p in pin_list] if f.name not in resource.per_weight]
        if missing:
            raise BitplanError(f"resource table {resource.source or resource.name} has no value for "
                               f"{', '.join(_unique_str(missing))}; add them or restrict --formats")
    # Per-layer storage and predicted ΔKL of every candidate, once; items sum them over their layers.
    alpha = np.array([r.alpha(objective) for r in layers])
    ok = np.array([[applicable(f, r.shape, r) and unsupported_reason(f, runtime, r.shape) is None
                    for f in candidates] for r in layers], dtype=bool)
    cand_bits = np.array([[storage_bits(cache, f, r.shape) if usable else 0 for f, usable in zip(candidates, row)]
                          for r, row in zip(layers, ok)], dtype=np.int64)
    # a format a layer cannot take costs inf there (only the uniform baseline reads it: items leave it out)
    cand_cost = np.where(ok, alpha[:, None] * np.array([[_t2(r, f) if usable else 0.0
                                                          for f, usable in zip(candidates, row)]
                                                         for r, row in zip(layers, ok)]), np.inf)
    cand_cb = np.array([cb_index.get(codebook_key(f), -1) for f in candidates], dtype=np.int64)
    fp16 = get_format("fp16")
    fixed_bits = 0
    for group in groups:
        pins_here = {pinned[i][1].name: pinned[i] for i in group if i in pinned}
        if len(pins_here) > 1:
            detail = ", ".join(f"{r}={f.name}" for r, f in pins_here.values())
            raise BitplanError(f"pins contradict the tie group {', '.join(layers[i].name for i in group)}: "
                               f"{detail}; tied layers share one format")
        items.append(group)
        if not pins_here and not free[group].all():
            pins_here = {fp16.name: ("scope blocks", fp16)}   # outside the scope: fp16, as before it was planned
        if pins_here:
            f = next(iter(pins_here.values()))[1]
            opts = [f]
            bits.append(np.array([sum(storage_bits(cache, f, layers[i].shape) for i in group)], dtype=np.int64))
            cost.append(np.array([sum(alpha[i] * _t2(layers[i], f) for i in group)]))
            cbs.append(np.array([cb_index.get(codebook_key(f), -1)], dtype=np.int64))
            if not free[group].all():
                fixed_bits += int(bits[-1][0])
        else:
            usable = np.flatnonzero(ok[group].all(axis=0))
            if usable.size == 0:
                raise BitplanError(f"no candidate format can store {layers[group[0]].name} "
                                   f"({layers[group[0]].shape[0]}×{layers[group[0]].shape[1]}); add one to --formats "
                                   "(fp16 always can)")
            opts = [candidates[j] for j in usable]
            bits.append(cand_bits[group][:, usable].sum(axis=0))
            cost.append(cand_cost[group][:, usable].sum(axis=0))
            cbs.append(cand_cb[usable])
        options.append(opts)
        if resource is not None:
            weights = sum(layers[i].params for i in group)
            res.append(np.array([resource.per_weight[f.name] * weights for f in opts]))
    constraints = {"formats": [f.name for f in candidates], "pins": [[r, f.name] for r, f in pin_list],
                   "min_bits": min_bits, "max_bits": max_bits, "tie": ties, "scope": scope, "runtime": runtime,
                   "resource": resource.to_json() if resource is not None else None}
    return Instance(profile=profile, objective=objective, candidates=candidates, items=items, options=options,
                    bits=bits, cost=cost, codebook=cbs, codebook_names=cb_names, candidate_bits=cand_bits,
                    candidate_cost=cand_cost,
                    codebook_bits=np.array([cb_bits[k] for k in cb_names], dtype=np.int64),
                    extras=extras_account(profile), block_weights=sum(r.params for r in profile.layers),
                    constraints=constraints, resource=resource, resource_use=res if resource is not None else None,
                    _bits_cache=cache, scope=scope, layers=layers, free=free, fixed_bits=fixed_bits)


def _tie_groups(layers: list[LayerRecord], ties: list[str]) -> list[list[int]]:
    """Union of the requested tie groups (e.g. qkv and gateup, or whole blocks), in layer order."""
    parent = list(range(len(layers)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for tie in ties:
        kinds = TIE_GROUPS[tie]
        first: dict[int, int] = {}
        for i, r in enumerate(layers):
            if kinds is not None and kind_family(r.kind) not in kinds:
                continue
            if r.block in first:
                parent[find(i)] = find(first[r.block])
            else:
                first[r.block] = i
    members: dict[int, list[int]] = {}
    for i in range(len(layers)):
        members.setdefault(find(i), []).append(i)
    return sorted(members.values(), key=lambda g: g[0])
