"""`solve`: profile + budget + constraints → Plan. The CLI and notebooks both call this."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BitplanError
from ..profile.schema import Profile, load_profile
from .budget import Budget, parse_budget
from .dp import solve_dp
from .ilp import solve_ilp
from .mckp import Solution
from .plan import LayerPlan, Plan, profile_identity, with_optimality
from .problem import Instance, Resource, build_instance, coefficient_name, load_resource, resolve_scope

SOLVERS = ("dp", "ilp")
DEFAULT_RESOLUTION = 1e-6  # bpw per DP cell: rounding up loses at most (items × resolution) bpw, then polished
ILP_TIME_LIMIT = 60.0      # seconds; CBC can take long to *prove* optimality when codebooks couple the layers


@dataclass
class Target:
    """A budget resolved against an instance: bits available to block linears and their codebooks."""
    budget: Budget
    layer_bits: int
    usable_bits: int | None = None   # the most bits any assignment of these formats stores
    reserve_bits: int = 0            # a whole-file budget's reserve for the file header and fp32 vectors

    def to_json(self, inst: Instance) -> dict:
        return {"given": self.budget.given, "kind": self.budget.kind, "value": float(self.budget.value),
                "scope": inst.scope, "bits": self.budget.bits(inst.budget_weights), "layer_bits": self.layer_bits,
                "resolved": describe(self.budget, inst.scope),
                "layer_bpw": inst.bpw_bits(self.layer_bits),
                **({"container_reserve_bits": self.reserve_bits} if self.budget.kind == "bytes" else {})}


def describe(budget: Budget, scope: str) -> str:
    """The budget in words, with what it covers under `scope`."""
    if budget.kind == "bpw" and scope == "all":
        return (f"{float(budget.value):g} bits per weight (storage, every planned weight: block linears, embedding "
                "and untied head; codebooks included)")
    if budget.kind == "bytes" and scope == "all":
        return (f"{float(budget.value):,.0f} bytes (whole file: block linears, embedding and head as planned, "
                "codebooks, fp16 norms)")
    return budget.describe()


_TENSORS_PER_LAYER = 5        # codes, scale, zero, rotation_seeds, and the layer's bias if it has one
_OTHER_TENSORS_PER_BLOCK = 8  # norms (up to 4 per block, 6 with q/k norms) and spare; plus the final norm


def container_reserve_bits(inst: Instance, file_bytes: int) -> int:
    """Bits a whole-file budget of `file_bytes` keeps for what the storage accounting leaves out: the safetensors
    header (a JSON entry per tensor, bounded from the names and sizes) and 1-D tensors (norms, biases), which the
    checkpoint stores in fp32 but the accounting counts as fp16. A bound: model.safetensors never exceeds it."""
    layers, extras = inst.layers, inst.profile.extras
    longest = max([len(r.name) for r in layers] + [len(e.name) for e in extras] + [0]) + 24   # + ".rotation_seeds"
    dim = max([max(r.shape) for r in layers] + [max(e.shape) for e in extras] + [1])
    # `"NAME":{"dtype":"BF16","shape":[d0,d1,d2],"data_offsets":[start,end]},`
    entry = longest + 48 + 3 * (len(str(dim)) + 1) + 2 * (len(str(max(file_bytes, 1))) + 1)
    blocks = len({r.block for r in inst.profile.layers})
    entries = (_TENSORS_PER_LAYER * len(layers) + len(extras) + _OTHER_TENSORS_PER_BLOCK * blocks + 4
               + len(inst.codebook_names))
    header = 8 + 64 + entries * entry + 8   # length prefix, metadata, entries, padding to 8 bytes
    return 8 * header + 16 * inst.extras.other_params


def resolve_budget(inst: Instance, budget) -> Target:
    """Bits for the plan's layers + codebooks; a budget outside the achievable range fails here, naming that range.
    A whole-file budget first sets aside the fp16 extras and `container_reserve_bits`; a bpw budget covers the
    scope's weights, so the layers outside it (scope `blocks`: the embedding and head, fp16 or pinned) come on top."""
    b = parse_budget(budget)
    total = b.bits(inst.budget_weights)
    reserve = container_reserve_bits(inst, total // 8) if b.kind == "bytes" else 0
    layer_bits = total - (inst.extras.bits + reserve) if b.kind == "bytes" else total + inst.fixed_bits
    lo, hi = inst.problem(0).bit_range()
    if layer_bits < lo:
        raise BitplanError(f"budget {b.given} is below what these constraints allow: {_range(inst, b, lo, hi)}")
    return Target(b, layer_bits, hi, reserve)


def notes(inst: Instance, target: Target) -> list[str]:
    """What a user should know about a plan that the plan alone does not say: a budget beyond what the formats
    can use, and predictions from estimated (not measured) errors."""
    out = []
    if target.budget.kind == "bytes" and not inst.profile.outer_layers:
        out.append("the embedding and output head stay fp16: this profile has no records of them (made before "
                   "bitplan measured them); remake it with `bitplan profile` to plan them under the budget")
    if target.usable_bits is not None and target.layer_bits > target.usable_bits:
        out.append(f"budget {target.budget.given} is more than these formats can use "
                   f"({_range(inst, target.budget, *inst.problem(0).bit_range())}): every layer gets its largest "
                   "format and the rest of the budget is unused")
    est = inst.estimated()
    if est:
        names = sorted(est)
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        out.append(f"{len(names)} candidate format(s) were not measured by the profile ({shown}): their error is the "
                   "Gaussian estimate (the format's t² on N(0,1) weights), not the layers' own. Measure them with "
                   "`bitplan profile ... --formats` into the profile's folder (only the new formats are measured), "
                   "or restrict --formats to the measured ones")
    return out


def _print_notes(lines: list[str]) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    for line in lines:
        console.print(f"[yellow]note: {line}[/]", markup=True, highlight=False)


def _range(inst: Instance, b: Budget, lo: int, hi: int) -> str:
    if b.kind == "bpw":
        over = ("every planned weight (block linears, embedding, untied head)" if inst.scope == "all"
                else "the block linears")
        return (f"achievable {inst.bpw_bits(lo):.4f}–{inst.bpw_bits(hi):.4f} bpw storage over {over} "
                f"(codebooks included)")
    reserve = container_reserve_bits(inst, b.bits(inst.budget_weights) // 8)
    extra = inst.extras.bits + reserve
    outer = [i for i, r in enumerate(inst.layers) if r.outer]
    if outer:
        lows = " and ".join(f"{inst.layers[i].kind} at {_bytes(_smallest_bits(inst, i))}" for i in outer)
        held = f"the plan's layers include the {lows} (smallest allowed format); "
        rest = f"other tensors (norms) in fp16: {_bytes(inst.extras.bits)}"
    else:
        held, rest = "", f"embedding/head and other tensors in fp16: {_bytes(inst.extras.bits)}"
    return (f"achievable {_bytes(lo + extra)}–{_bytes(hi + extra)} for the whole file "
            f"({held}{rest}; file header and fp32 vectors: at most {_bytes(reserve)})")


def _fixed_format(inst: Instance, layer: int):
    """The one format a layer outside the scope has (fp16, or its pin)."""
    item = next(k for k, members in enumerate(inst.items) if layer in members)
    return inst.options[item][0]


def _smallest_bits(inst: Instance, layer: int) -> int:
    """The least storage `layer` can have among its item's options."""
    item = next(k for k, members in enumerate(inst.items) if layer in members)
    return min(inst.layer_bits(layer, f) for f in inst.options[item])


def _bytes(bits: int) -> str:
    n = math.ceil(bits / 8)
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.4g} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def quantum_bits(inst: Instance, resolution: float) -> int:
    """DP cell size: `resolution` bpw of the block weights, snapped to the gcd of the options' bits.

    If every option's bits are multiples of a cell at least as coarse as asked, that cell makes the DP exact."""
    if not resolution > 0:
        raise BitplanError(f"--resolution must be positive, got {resolution}")
    q = max(1, math.floor(resolution * inst.block_weights))
    g = int(np.gcd.reduce(np.concatenate(inst.bits)))
    if g >= q:
        return g
    return max(g, q // g * g) if g > 0 else q


def run_solver(inst: Instance, layer_bits: int, solver: str, resolution: float,
               time_limit: float | None) -> Solution:
    problem = inst.problem(layer_bits)
    if solver == "dp":
        if inst.resource is not None:
            raise BitplanError("a second resource (--resource) needs --solver ilp")
        return solve_dp(problem, quantum_bits(inst, resolution))
    if solver == "ilp":
        start = None
        if inst.resource is None:  # the DP's plan as CBC's first incumbent: the ILP can then only improve on it
            start = solve_dp(problem, quantum_bits(inst, resolution)).choice
        return solve_ilp(problem, time_limit=time_limit or ILP_TIME_LIMIT, start=start)
    raise BitplanError(f"unknown solver {solver!r}; choose dp or ilp")


def best_uniform(inst: Instance, layer_bits: int) -> dict | None:
    """The single candidate format that, on every layer, has the lowest predicted ΔKL and fits the budget.

    Pins, ties and the second resource are ignored: this is the plain baseline a user would otherwise pick."""
    free = inst.free if inst.free is not None else np.ones(len(inst.layers), dtype=bool)
    fixed = [i for i in range(len(inst.layers)) if not free[i]]
    fixed_cost = sum(inst.layer_cost(i, _fixed_format(inst, i)) for i in fixed)
    bits = inst.candidate_bits[free].sum(axis=0) + np.array([int(f.codebook_bits) for f in inst.candidates]) \
        + inst.fixed_bits
    cost = inst.candidate_cost[free].sum(axis=0) + fixed_cost
    fits = np.flatnonzero((bits <= layer_bits) & np.isfinite(cost))   # inf: a layer cannot take the format
    if fits.size == 0:
        return None
    j = int(fits[np.lexsort((bits[fits], cost[fits]))[0]])  # lowest ΔKL, then fewest bits
    return {"format": inst.candidates[j].name, "storage_bits": int(bits[j]),
            "storage_bpw": inst.bpw_bits(int(bits[j])),
            "total_bytes": math.ceil((int(bits[j]) + inst.extras.bits) / 8), "predicted_dkl": float(cost[j])}


def make_plan(inst: Instance, solution: Solution, target: Target, solver: str, profile_id: dict) -> Plan:
    layers = inst.layers
    chosen: dict[int, object] = {}
    for item, opts, j in zip(inst.items, inst.options, solution.choice):
        for i in item:
            chosen[i] = opts[int(j)]
    entries = [LayerPlan(name=r.name, format=chosen[i].name, block=r.block, kind=r.kind, shape=tuple(r.shape),
                         storage_bits=inst.layer_bits(i, chosen[i]), predicted_dkl=inst.layer_cost(i, chosen[i]),
                         ties=list(r.ties))
               for i, r in enumerate(layers)]
    stats = {k: (float(v) if isinstance(v, (np.floating, float)) else int(v) if isinstance(v, (np.integer, int))
                 and not isinstance(v, bool) else v) for k, v in solution.stats.items()}
    solver_info = {"name": solver, "optimal": solution.optimal, **stats}
    if "lower_bound" in stats and solution.cost > 0:  # a certificate: no plan can beat the bound
        solver_info["gap_to_lower_bound"] = (solution.cost - stats["lower_bound"]) / solution.cost
    solver_info = with_optimality(solver_info)
    if inst.resource is not None:
        solver_info["resource_used_per_weight"] = (
            float(sum(float(r[int(j)]) for r, j in zip(inst.resource_use, solution.choice))) / inst.budget_weights)
    plan = Plan(profile=profile_id, budget=target.to_json(inst), solver=solver_info, objective=inst.objective,
                constraints=inst.constraints, layers=entries, extras=inst.extras.to_json(),
                uniform=best_uniform(inst, target.layer_bits),
                coefficient=coefficient_name(inst.profile, inst.objective), scope=inst.scope,
                runtime=inst.constraints.get("runtime", "any"))
    if plan.totals["layer_bits"] + plan.totals["codebook_bits"] > target.layer_bits:
        raise AssertionError("solver returned a plan over its budget")
    return plan


def _load(profile: Profile | str | Path) -> tuple[Profile, dict]:
    if isinstance(profile, Profile):
        return profile, profile_identity(profile, None)
    prof = load_profile(profile)
    return prof, profile_identity(prof, profile)


def _resource(resource, resource_limit):
    if resource is None or isinstance(resource, Resource):
        return resource
    return load_resource(resource, resource_limit)


def solve(profile: Profile | str | Path, budget: str | float | Budget, solver: str = "dp",
          objective: str | None = None, formats=None, pins=(), min_bits: float | None = None,
          max_bits: float | None = None, tie=None, resource: Resource | str | Path | None = None,
          resource_limit: float | None = None, resolution: float = DEFAULT_RESOLUTION,
          time_limit: float | None = None, notes_to_stderr: bool = True, scope: str | None = None,
          runtime: str = "any") -> Plan:
    """Choose a format for every block linear layer of `profile` within `budget`, minimizing predicted ΔKL.

    budget: `3.25bpw`, `2.1GB`, `1.8GiB`, `500MB`, `700MiB` (or a number of bpw). solver: `dp` (exact dynamic
    program; `resolution` bpw cells) or `ilp` (CBC; needed for a second `resource`). objective: yaqa (the judge's
    coefficient when the profile has one, else the halves'), yaqa-halves, hessian or noise; None picks the best the
    profile has. formats: comma list of names and sets (profile, default, all,
    grid, int, kernel, ggml, vllm). pins: `REGEX=FORMAT` strings. min_bits/max_bits bound each layer's nominal bits.
    tie: comma list of qkv, gateup, attn, mlp, block. resource: a Resource or a JSON/CSV table path.
    `notes_to_stderr` prints `notes` (a budget the formats cannot use, unmeasured formats' estimates) to stderr.
    scope: `all` (the embedding and an untied head are planned like any layer, and a bpw budget is per planned
    weight) or `blocks` (they stay fp16 unless pinned; a bpw budget is per block-linear weight); None: `all` for a
    byte budget on a profile that measured them, else `blocks`.
    runtime: `any` (bitplan's own loader runs every format) or `vllm`: candidates narrowed to what vLLM runs (its
    menu when `formats` is None), q/k/v and gate/up tied per block, scope `blocks` (embedding and head fp16).
    """
    if solver not in SOLVERS:
        raise BitplanError(f"unknown solver {solver!r}; choose dp or ilp")
    prof, identity = _load(profile)
    scope = resolve_scope(prof, scope, parse_budget(budget).kind, runtime)
    inst = build_instance(prof, objective, formats, pins, min_bits, max_bits, tie, _resource(resource, resource_limit),
                          scope=scope, runtime=runtime)
    target = resolve_budget(inst, budget)
    solution = run_solver(inst, target.layer_bits, solver, resolution, time_limit)
    plan = make_plan(inst, solution, target, solver, identity)
    if notes_to_stderr:
        _print_notes(notes(inst, target))
    return plan
