"""`bitplan apply`: quantize every layer of a model to its assigned format and write a packed checkpoint.

Layers are independent (the factors come from the original model), so each is rounded on its own, in parallel
threads if asked, and saved as one part file in a job folder beside the output. A killed run resumes from the
parts already written; a part is reused only if it was made from the same weights, format, rounding and factors.
A model saved as safetensors is never loaded whole (bitplan.apply.source): each layer's weight is read from its
shard when the layer is rounded, and the checkpoint is assembled one tensor at a time from the part files and
the shards (checkpoint.write_checkpoint_parts), so memory holds about one layer's weight and factors at a time
per worker. The rounding itself (factor preparation, block LDL, error feedback) runs on `device`.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..devices import resolve_device, resolve_dtype
from ..distributed import Ranks
from ..errors import BitplanError
from ..formats import get_format
from ..heldout import DEFAULT_SHRINK_TARGET, Shrinkage, check_target
from ..io import atomic_path
from ..resources import row_block_rows
from ..linalg import relative_error_of_blocks
from ..memory import map_large_blocks, release_freed_memory
from ..models import LoadedModel, find_linears
from ..profile.directory import ProfileDir
from ..progress import Progress
from .checkpoint import check_out_dir, mark_owned, remove_owned, sibling, write_checkpoint, write_checkpoint_parts
from .embedding import is_tied, module_name, vocab_matrices
from .layer import ROUNDINGS, TILE, LayerResult, quantize_layer, quantize_rows, rows_round_alone
from .source import WeightSource, open_source


@dataclass
class ApplyResult:
    out_dir: Path
    formats: dict[str, str]
    stats: dict[str, dict] = field(default_factory=dict)


def job_dir(out_dir: Path) -> Path:
    return sibling(out_dir, "job")


def _part_key(weights_hash: str, name: str, fmt: str, rounding: str, shrink: str | float, factors_id: str) -> str:
    return hashlib.sha256(f"{weights_hash}|{name}|{fmt}|{rounding}|{shrink}|{factors_id}".encode()).hexdigest()


def _read_part(path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("bitplan", "{}"))
            if meta.get("key") != key:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}, meta.get("stats", {})
    except Exception:  # a damaged part is redone, never trusted
        return None


def _note(text: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[yellow]{escape(text)}[/]", soft_wrap=True)


def layer_factors(profile: ProfileDir | None, name: str, rounding: str, shape: tuple[int, int] | None = None):
    """A layer's factors from the profile (both halves, for choosing λ), or the error that says what to pass
    instead. `shape` (the weight's [out, in]) is checked against the factors' sizes."""
    f = _profile_with_factors(profile, rounding).factors(name, rounding)
    _check_shape(profile, name, f.xtx_a if f.one_sided else f.h_in_a, None if f.one_sided else f.h_out_a, shape)
    return f


def rounding_factors(profile: ProfileDir | None, name: str, rounding: str, shape: tuple[int, int] | None = None):
    """(H_in, H_out, one_sided): what `rounding` rounds `name` with, each the sum of both halves in float64,
    read without the factors it does not use; checked against the weight's `shape` as layer_factors does."""
    sums = _profile_with_factors(profile, rounding).summed_factors(name, rounding)
    H_in = sums.tensors.get("xtx" if rounding == "ldlq" else "h_in")
    H_out = sums.tensors.get("h_out")
    _check_shape(profile, name, H_in, H_out, shape)
    return H_in, H_out, sums.one_sided


def _profile_with_factors(profile: ProfileDir | None, rounding: str) -> ProfileDir:
    if profile is None:
        raise BitplanError(f"{rounding} rounding needs a profile with Hessian factors (hessians/); "
                           "pass the profile, or use --rounding rtn")
    return profile


def _check_shape(profile: ProfileDir, name: str, H_in: torch.Tensor, H_out: torch.Tensor | None,
                 shape: tuple[int, int] | None) -> None:
    """Factors of another model fail here, not in the rounding."""
    if shape is None:
        return
    if H_out is None and H_in.shape[0] != shape[1]:
        raise BitplanError(f"the factor of {name} in {profile.path} is {H_in.shape[0]}×{H_in.shape[0]}, the "
                           f"model's weight has {shape[1]} columns: the profile is of another model; "
                           "pass this model's profile with --profile")
    if H_out is not None and (H_out.shape[0], H_in.shape[0]) != tuple(shape):
        raise BitplanError(f"the factors of {name} in {profile.path} are {H_out.shape[0]}×{H_in.shape[0]}, "
                           f"the model's weight is {shape[0]}×{shape[1]}: the profile is of another model; "
                           "pass this model's profile with --profile")


def factor_sides(profile: ProfileDir | None, name: str) -> str | None:
    """What the profile keeps for `name`: "both" (Kronecker factors), "input" (the head input's Σhhᵀ alone, for
    one-sided LDLQ) or None."""
    from ..profile.hessians import stored_sides

    return stored_sides(profile.path, name) if profile is not None else None


def vocab_rounding(kind: str, rounding: str, sides: str | None, tied: bool = False) -> tuple[str, str | None]:
    """How the embedding or the untied head is rounded under the plan's `rounding` (yaqa or ldlq), given what
    the profile keeps for it (`factor_sides`), and why when not that way.
    The embedding is a lookup table: no input passes through it. Tied to the head, it is rounded with one-sided
    LDLQ along the hidden dimension under the head's input second moment E[hhᵀ] when the profile holds it
    (measured 0.70 × round-to-nearest's KL in q4_0, 0.46 × in int4-g128, docs/results.md), else to nearest;
    untied, to nearest (error feedback under its output gradient measured worse than rounding to nearest).
    The head is a linear layer: the plan's rounding from its Kronecker factors, one-sided LDLQ from its input
    moment alone, to nearest when the profile has neither."""
    if rounding == "rtn":
        return "rtn", None
    if kind == "embedding":
        if tied and sides == "input":
            return "ldlq", None
        return "rtn", ("the embedding is a lookup table, and the profile holds no hidden × hidden factor for it: "
                      "rounded to nearest")
    if sides == "both":
        return rounding, None
    if sides == "input":
        return "ldlq", None
    return "rtn", f"the profile has no factors for the head: rounded to nearest instead of {rounding}"


def check_workers(workers: int | None) -> None:
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise BitplanError(f"--workers must be a whole number ≥ 1 (layers rounded at once), got {workers!r}")


def check_profile_model(profile: ProfileDir | None, weights_hash: str) -> None:
    """Refuse a profile whose profile.json records other weights than the model's, before any work."""
    recorded = (profile.profile.model if profile is not None and profile.profile is not None else {})
    theirs = recorded.get("weights_sha256")
    if theirs and theirs != weights_hash:
        raise BitplanError(f"the profile {profile.path} is of another model ({recorded.get('id')}, weights "
                           f"{theirs[:12]}…, not {weights_hash[:12]}…); pass this model's profile with --profile")


def auto_shrink(f, name: str, target: str = DEFAULT_SHRINK_TARGET) -> Shrinkage:
    """λ of H_O and of H_I chosen by the held-out gain of the two calibration halves (see bitplan.heldout)."""
    from ..heldout import crossfit
    from ..profile.coefficients import rotated_halves

    return crossfit(*rotated_halves(f, target, with_xtx=False), name=name).shrinkage(target, f.samples)


def parse_shrink(value: str | float | dict) -> str | float | dict:
    """`auto`, a number in [0, 1], or a dict layer → λ."""
    if isinstance(value, dict):
        return {k: parse_shrink(v) for k, v in value.items()}
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = float(value)
        except ValueError:
            raise BitplanError(f"--shrink must be 'auto' or a number between 0 and 1, got {value!r}") from None
    if not 0.0 <= float(value) <= 1.0:
        raise BitplanError(f"--shrink must be 'auto' or a number between 0 and 1, got {value}")
    return float(value)


def apply_formats(model: str | LoadedModel | WeightSource, formats: dict[str, str], out_dir: str | Path,
                  rounding: str = "yaqa", profile_dir: str | Path | ProfileDir | None = None,
                  shrink: str | float | dict[str, float] = "auto",
                  shrink_target: str = DEFAULT_SHRINK_TARGET, workers: int | None = None,
                  metadata: dict[str, Any] | None = None, progress: bool = True,
                  ranks: Ranks | None = None, overwrite: bool = False, device: str | torch.device = "auto",
                  dtype: str | torch.dtype = "auto", lazy: bool | None = None) -> ApplyResult:
    """Quantize `model`'s layers to `formats` (layer name → format name) and write a checkpoint to `out_dir`.

    `shrink` moves the normalized factors toward `shrink_target` for YAQA rounding: "auto" (λ of H_O and of
    H_I per layer, chosen on the profile's two calibration halves), or one λ or λ per layer for H_O alone.
    Layers not named in `formats` keep their original weights. `workers` layers are rounded at once (default:
    one per core on the CPU, one on a GPU), each on one torch thread: rounding is many small tensor ops, which
    several intra-op threads slow down.
    A model given by name is read from its safetensors shards one layer at a time (`lazy` None: where it is
    saved so, else loaded whole with a note; True: or fail; False: always loaded whole); a LoadedModel is used
    as it is. Each layer's weight is taken in `dtype` (bitplan.devices: auto is float32 on the CPU, the
    checkpoint's own dtype on a GPU) and upcast to float64 for the rounding, whose factor preparation and error
    feedback run on `device` (auto: the first GPU, else the CPU).
    Under torchrun the processes split the layers (`ranks`, default: torchrun's group or one process); each
    writes its layers' part files and rank 0 assembles the checkpoint from them.
    A checkpoint already in `out_dir` is refused unless `overwrite` (then only the files bitplan wrote there are
    replaced); `out_dir` is checked before the model loads.
    """
    ranks = ranks or Ranks.current()
    progress = progress and ranks.main
    check_out_dir(out_dir, overwrite)
    check_workers(workers)
    if rounding not in ROUNDINGS:
        raise BitplanError(f"unknown rounding {rounding!r}; choose one of {', '.join(ROUNDINGS)}")
    device = resolve_device(device)
    source = open_source(model, lazy, note=_note if progress else None, device=device, dtype=dtype)
    lm = source   # model, tokenizer, model_id as a LoadedModel has them
    weight_dtype = resolve_dtype(dtype, device, lm.model.config.to_dict())
    out_dir = Path(out_dir)
    known = {info.name: info for info in find_linears(lm.model)}
    vocab = vocab_matrices(lm.model)   # the embedding, and the head when it is not tied to it
    head = module_name(lm.model, lm.model.get_output_embeddings())
    if head in formats and head not in vocab and is_tied(lm.model):
        raise BitplanError(f"the plan gives the head {head} a format, but it is tied to the embedding "
                           f"{next(iter(vocab), '?')}: the shared matrix is one entry, the embedding's")
    unknown = sorted(set(formats) - set(known) - set(vocab))
    if unknown:
        raise BitplanError(f"the plan names {len(unknown)} layer(s) the model does not have, e.g. {unknown[0]}")
    fmts = {name: get_format(f) for name, f in formats.items()}  # unknown format names fail before any work
    # An embedding or head planned fp16 is stored as every other fp16 tensor is: the same bytes, no module to swap
    work = [n for n in formats if not (n in vocab and fmts[n].kind == "fp16")]
    shrink = parse_shrink(shrink)
    check_target(shrink_target)
    profile = ProfileDir.of(profile_dir)
    weights_hash = source.weights_sha256
    check_profile_model(profile, weights_hash)
    jobs = job_dir(out_dir)
    mark_owned(jobs)
    tied = is_tied(lm.model)
    sides = {n: factor_sides(profile, n) for n in vocab if n in formats}

    def settings(name: str):
        """(method, λ, part file, key) of a layer; the key changes with anything that changes the part."""
        fmt = fmts[name]
        lam = shrink.get(name, "auto") if isinstance(shrink, dict) else shrink
        method = rounding if fmt.kind != "fp16" else "rtn"
        if name in vocab:
            method = vocab_rounding(vocab[name], method, sides[name], tied)[0]
        # without a profile there is no key to match; `one` then fails with layer_factors's clear error
        ident = profile.factors_id(name) if method != "rtn" and profile is not None else "none"
        key = _part_key(weights_hash, name, fmt.name, method, f"{lam}:{shrink_target}" if method == "yaqa" else 0.0,
                        ident)
        return method, lam, jobs / f"{name}.safetensors", key

    def one(name: str) -> tuple[str, dict[str, torch.Tensor], dict]:
        fmt = fmts[name]
        method, lam, part, key = settings(name)
        cached = _read_part(part, key)
        if cached is not None:
            return name, *cached
        shape = tuple(source.tensor_info(f"{name}.weight")[1])   # the weight is read after its factors
        if method == "yaqa" and lam == "auto":
            # the profile's choice when it was made from these factors, else recomputed from both halves (read
            # for that alone, before the sums the rounding reads)
            lams = (_profile_with_factors(profile, method).chosen_shrinkage(name, shrink_target)
                    or auto_shrink(layer_factors(profile, name, method, shape), name, shrink_target))
        else:
            lams = Shrinkage(lam if method == "yaqa" else 0.0, 0.0, shrink_target)
        H_in, H_out, one_sided = (rounding_factors(profile, name, method, shape) if method != "rtn"
                                  else (None, None, False))
        rows = row_block_rows(*shape, TILE) if rows_round_alone(fmt, method) else None
        if rows:   # a large matrix whose rows round alone (an embedding, say): a block of rows at a time
            blocks = (W.to(weight_dtype) for W in source.chunks(f"{name}.weight", rows))
            res: LayerResult = quantize_rows(name, blocks, shape, fmt, method, H_in, device=device,
                                             consume_factors=True)
        else:
            W = source.weight(name)
            res = quantize_layer(name, W.to(weight_dtype), fmt, method, H_in, H_out, shrink_out=lams.out,
                                 shrink_in=lams.inp, target=shrink_target, device=device, consume_factors=True)
            del W
        del H_in, H_out
        stats = {**res.stats, **lams.stats(), "format": fmt.name, "rounding": method}
        if name in vocab:
            stats.update(kind=vocab[name], rounding_note=vocab_rounding(vocab[name], rounding, sides[name], tied)[1])
            if method == "ldlq" and one_sided:
                stats["h_in"] = "the head input's second moment E[hhᵀ]"
        with atomic_path(part) as tmp:
            save_file({k: v.contiguous() for k, v in res.tensors.items()}, str(tmp),
                      metadata={"bitplan": json.dumps({"key": key, "stats": stats})})
        packed = None if source.lazy else res.tensors
        del res
        release_freed_memory()
        return name, packed, stats

    notes = [f"{n}: {note}" for n in work if n in vocab
             for note in [vocab_rounding(vocab[n], rounding, sides[n], tied)[1]] if note]
    if progress:
        for note in notes:
            _note(note)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    stats: dict[str, dict] = {}
    map_large_blocks()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Progress(progress) as bars:
            mine = ranks.share(work)
            task = bars.task(f"{rounding} rounding", len(mine))
            default_workers = 1 if device.type != "cpu" else os.cpu_count() or 1
            with ThreadPoolExecutor(max_workers=workers or default_workers) as pool:
                for name, tensors, st in pool.map(one, mine):
                    layers[name], stats[name] = tensors, st
                    task.advance()
    finally:
        torch.set_num_threads(threads)
    for name in formats:   # an embedding or head planned fp16: its stats as the fp16 tensor the file keeps
        if name not in work:
            err = relative_error_of_blocks((w, w.half()) for w in source.chunks(f"{name}.weight"))
            stats[name] = {"format": fmts[name].name, "rounding": "rtn", "kind": vocab[name], "rel_err": err}
    ranks.barrier()
    if not ranks.main:
        ranks.barrier()  # rank 0 assembles the checkpoint
        return ApplyResult(out_dir=out_dir, formats={n: fmts[n].name for n in formats}, stats=stats)
    if source.lazy:   # every layer's packed tensors stay in its part file until the checkpoint is written
        for name in work:
            *_, part, key = settings(name)
            cached = _read_part(part, key)   # one layer's packed tensors at a time: its stats, and a check
            if cached is None:
                raise BitplanError(f"the part file of {name} is missing or damaged ({part}); run the same command "
                                   "again to redo it")
            stats[name] = cached[1]
            del cached
    for name in work:  # the other ranks' layers, from their part files
        if name not in layers and not source.lazy:
            *_, part, key = settings(name)  # reads no factors: only the part file's key
            cached = _read_part(part, key)
            if cached is None:
                raise BitplanError(f"the part file of {name} from another process is missing or damaged ({part})")
            layers[name], stats[name] = cached
    stats = {n: stats[n] for n in formats}

    meta = {"rounding": rounding, "source_model": {"id": lm.model_id, "weights_sha256": weights_hash},
            "layers": stats, "vocab_modules": {n: vocab[n] for n in work if n in vocab},
            "tied_head": is_tied(lm.model), **(metadata or {})}
    if source.lazy:
        write_checkpoint_parts(out_dir, source, {n: settings(n)[2] for n in work}, {n: fmts[n].name for n in work},
                               meta, overwrite=overwrite)
    else:
        write_checkpoint(out_dir, lm.model, lm.tokenizer, {n: layers[n] for n in work},
                         {n: fmts[n].name for n in work}, meta, overwrite=overwrite)
    remove_owned(jobs, [f"{name}.safetensors" for name in work])
    ranks.barrier()
    return ApplyResult(out_dir=out_dir, formats={n: fmts[n].name for n in formats}, stats=stats)


def simulate(model: torch.nn.Module, W_hat: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The dequantized ("fake-quantized") model: `model` with each named layer's weight replaced, in place,
    and every other tensor rounded as the checkpoint stores it (fp16 matrices, fp32 vectors)."""
    from .checkpoint import _keep_precision

    with torch.no_grad():
        for key, t in model.state_dict(keep_vars=True).items():
            if t.is_floating_point():
                t.copy_(_keep_precision(key, t).to(t.dtype))
        for name, W in W_hat.items():
            model.get_submodule(name).weight.copy_(W)
    return model


_LIKE = {"noise": "hessian"}   # α_noise plans like α_hessian (not measured on its own)
_WARN_RATIO = 1.1   # within this of the best objective's KL a plan is not worth re-solving (noise of one run: ~3 %)


@dataclass(frozen=True)
class MeasuredKL:
    """measured_kl.json: the mean KL of each objective's plan rounded each way (docs/results.md, "Which objective
    for which rounding"), with what was measured and the command that measures it again."""
    model: str
    budget: str
    evaluation: str
    command: str
    date: str
    table: dict[str, dict[str, tuple[float, float]]]   # objective → rounding → (KL, standard error)

    def kl(self, objective: str, rounding: str) -> float | None:
        return self.table.get(objective, {}).get(rounding, (None,))[0]


@functools.cache
def measured_kl() -> MeasuredKL:
    data = json.loads(resources.files(__package__).joinpath("measured_kl.json").read_text(encoding="utf-8"))
    table = {o: {r: tuple(v) for r, v in row.items()} for o, row in data["table"].items()}
    return MeasuredKL(data["model"], data["budget"], data["evaluation"], data["command"], data["date"], table)


def rounding_mismatch(objective: str, rounding: str) -> str | None:
    """A warning when plans of `objective` measured ≥ 1.1 × the KL of another objective's plan with `rounding`,
    else None. A YAQA plan, say, gives its fewest bits to layers whose error YAQA removes (attention queries at
    1.6 bpw), which round to nearest far worse than one format everywhere."""
    measured = measured_kl()
    ours = measured.kl(_LIKE.get(objective, objective), rounding)
    if ours is None:
        return None
    best = min((o for o in measured.table if measured.kl(o, rounding) is not None),
               key=lambda o: measured.kl(o, rounding))
    theirs = measured.kl(best, rounding)
    if ours < _WARN_RATIO * theirs:
        return None
    measured_by = (f"--objective {_LIKE[objective]}'s plan (α_noise plans like α_hessian)" if objective in _LIKE
                   else "such a plan")
    return (f"this plan was solved with --objective {objective}. Rounded with {rounding}, {measured_by} measured "
            f"{ours / theirs:.2f} × the KL of --objective {best}'s ({ours:.3f} against {theirs:.3f} at "
            f"{measured.budget} on {measured.model}). For {rounding} rounding, solve with --objective {best}")


def over_budget(plan) -> str | None:
    """What a plan spends beyond its own budget (a plan edited by hand, say every layer int8), or None."""
    totals, budget = plan.totals, plan.budget
    if totals.get("within_budget", True) or not budget.get("layer_bits"):
        return None
    weights = totals["block_weights"]
    return (f"the plan's layers take {totals['storage_bpw']:.3f} bpw, over its budget {budget.get('given')} "
            f"({budget['layer_bits'] / weights:.3f} bpw for the block linears)")


def check_budget(plan, plan_path: Path, strict: bool) -> None:
    """Refuse (`strict`) or warn loudly about a plan over its budget: the checkpoint would be larger than asked."""
    excess = over_budget(plan)
    if excess is None:
        return
    if strict:
        raise BitplanError(f"{plan_path}: {excess}; refusing it (--strict): solve again for this budget, or drop "
                           "--strict to apply it anyway")
    if Ranks.current().main:
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True).print(f"[bold red]warning:[/] [red]{escape(str(plan_path))}: {escape(excess)}; applying "
                                   "it anyway (--strict refuses such a plan)[/]", soft_wrap=True)


def apply_plan(plan_path: str | Path, out_dir: str | Path, model: str | LoadedModel | None = None,
               rounding: str | None = None, profile_dir: str | Path | None = None, shrink: str | float = "auto",
               shrink_target: str = DEFAULT_SHRINK_TARGET,
               workers: int | None = None, progress: bool = True, overwrite: bool = False,
               strict: bool = False, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
               lazy: bool | None = None) -> ApplyResult:
    """Quantize the model a plan names (or `model`) to the plan's formats; factors from the plan's profile
    (or `profile_dir`, e.g. a profile run with Hessians when the plan came from a shipped profile).
    `rounding` None rounds as the plan was solved for (`plan.rounding`); another one overrides it, with a
    warning when plans of the plan's objective measured worse that way than another objective's.
    A plan over its own budget (edited by hand) is applied with a warning, or refused if `strict`; `out_dir` is
    checked before anything loads (see apply_formats for `overwrite`, `device`, `dtype` and `lazy`)."""
    from ..solve import load_plan

    check_workers(workers)
    check_out_dir(out_dir, overwrite)
    plan_path = Path(plan_path)
    plan = load_plan(plan_path)
    check_budget(plan, plan_path, strict)
    rounding = plan.rounding if rounding is None else rounding
    recorded = (plan.profile or {}).get("model") or {}
    spec = model if model is not None else recorded.get("spec") or recorded.get("id")
    if spec is None:
        raise BitplanError(f"{plan_path} does not name its model; pass --model")
    resolve_device(device)   # a device torch cannot use fails before the model is read
    source = open_source(spec, lazy, note=_note if progress and Ranks.current().main else None, device=device,
                         dtype=dtype)
    expected = recorded.get("weights_sha256")
    if expected and source.weights_sha256 != expected:
        raise BitplanError(f"{plan_path} was made for other weights than {source.spec} (weights hash differs); "
                           "profile and solve for this model, or pass the model the plan was made for")
    mismatch = rounding_mismatch(plan.objective, rounding)
    if mismatch and Ranks.current().main:
        from rich.console import Console

        Console(stderr=True).print(f"[yellow]{mismatch}[/]")
    profile = ProfileDir.of(profile_dir) or ProfileDir.recorded_in(plan.profile, plan_path)
    if rounding != "rtn" and (profile is None or not profile.has_hessians):
        where = profile.path if profile else "the plan’s profile"
        raise BitplanError(f"{rounding} rounding needs Hessian factors, and {where} has "
                           "no hessians/ (shipped profiles leave them out): run `bitplan profile` and pass its folder "
                           "with --profile, or use --rounding rtn with a plan solved by `bitplan solve --objective "
                           "hessian` (a plan for YAQA rounds to nearest badly)")
    metadata = {"plan": {"path": str(plan_path), "budget": plan.budget.get("given"), "totals": plan.totals,
                         "objective": plan.objective},
                "calibration": profile.calibration if profile else {}, "shrink": shrink, "shrink_target": shrink_target}
    return apply_formats(source, plan.formats, out_dir, rounding=rounding, profile_dir=profile, shrink=shrink,
                         shrink_target=shrink_target, workers=workers, metadata=metadata, progress=progress,
                         overwrite=overwrite, device=device, dtype=dtype)
