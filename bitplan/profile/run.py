"""`profile_model`: the whole profile of a model, resumable, written to an output directory.

Phases (each resumable on its own, see job.py):
  1. noise   α_noise per layer by noise injection on the first `noise_samples` calibration windows;
  2. factors Kronecker factors of every block linear on two halves of the calibration windows (seeded, or by
             where they start in the source: `halves`), one half after the other (only one half's float64 sums
             are in memory), checkpointed every few batches;
             each half's hessians/<half>/<layer>.safetensors as soon as the half is complete;
  3. layers  per layer: predicted coefficients from the factors (block LDL, held-out gains);
  4. formats per layer: the relative error of every candidate format (the candidate list is not part of the
             job's fingerprint: asking a finished profile for other formats measures only those);
then profile.json and sensitivity.csv; then (by default; `judge_samples` = 0 goes without) the judge (judge.py):
windows sampled from the model, their factors in hessians/judge/, each layer's fit judged under them. The judge
is an addition to a finished profile, not part of its fingerprint: asking a finished profile for one computes
only the judge.
"""
from __future__ import annotations

import hashlib
import json
import re
import resource
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from .. import __version__
from ..distributed import Ranks
from ..errors import BitplanError
from ..formats import Format, default_candidates, get_format
from ..heldout import DEFAULT_SHRINK_TARGET
from ..io import atomic_path, read_json, write_json
from ..linalg import LDL
from ..models import LoadedModel, find_extras, find_linears, get_module, load_model, weights_sha256
from .coefficients import layer_coefficients
from .defaults import (DEFAULT_CHUNK, DEFAULT_HALVES, DEFAULT_JUDGE_SAMPLES, DEFAULT_NOISE_SAMPLES, DEFAULT_SAMPLES,
                       DEFAULT_SEQLEN, HALF_SPLITS)
from .factors import ChunkStats, FactorSums
from .hessians import HALVES, HESSIAN_DIR, factors_path, load_factors, read_half_factors, save_half_factors
from .job import Job
from .judge import (JUDGE, JUDGE_WINDOW_OFFSET, JudgedGains, find_start_token, judged_gains, sample_windows,
                    start_token)
from .noise import DEFAULT_LEVELS, NoiseMeter, build_cache
from .relerr import relative_errors
from .schema import LayerRecord, Profile, load_profile
from .seeds import generator
from .sketch import SketchTimes, accumulate_batch


Events = Callable[[str, int], None]


@dataclass
class Calibration:
    windows: torch.Tensor          # [samples, seqlen] token ids
    description: dict
    positions: torch.Tensor        # [samples] where each window starts in the source (row order for token ids)


def default_out_dir(model_id: str) -> Path:
    return Path(f"profile-{re.sub(r'[^A-Za-z0-9._-]+', '-', model_id).strip('-') or 'model'}")


def _resolve_model(model: str | Path | LoadedModel | nn.Module) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        model.eval()
        return LoadedModel(model=model, tokenizer=None, spec=type(model).__name__, model_id=type(model).__name__,
                           path=Path("."))
    return load_model(str(model))


def _calibration(loaded: LoadedModel, calib: str | Path | torch.Tensor, samples: int | None, seqlen: int | None,
                 seed: int) -> Calibration:
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.dtype != torch.long:
            raise BitplanError(f"calibration token ids must be a LongTensor [windows, seqlen], got "
                               f"{calib.dtype} {tuple(calib.shape)}")
        for what, given, actual in (("samples", samples, calib.shape[0]), ("seqlen", seqlen, calib.shape[1])):
            if given is not None and given != actual:
                raise BitplanError(f"{what}={given} disagrees with the calibration tensor's shape {tuple(calib.shape)}")
        digest = hashlib.sha256(calib.contiguous().numpy().tobytes()).hexdigest()
        desc = {"source": "token ids passed to profile_model", "sha256": digest, "documents": None}
        windows, positions = calib, torch.arange(calib.shape[0])
    else:
        from ..data import describe_source, placed_token_windows

        if loaded.tokenizer is None:
            raise BitplanError("calibration text needs the model's tokenizer; pass token ids instead")
        samples = DEFAULT_SAMPLES if samples is None else samples
        seqlen = DEFAULT_SEQLEN if seqlen is None else seqlen
        context = getattr(loaded.model.config, "max_position_embeddings", None)
        windows, positions = placed_token_windows(loaded.tokenizer, str(calib), samples, seqlen, seed,
                                                  max_context=context)
        desc = describe_source(str(calib)).describe()
    n, T = windows.shape
    if n < 2:
        raise BitplanError(f"profiling needs at least 2 calibration windows (two halves), got {n}")
    desc.update(samples=n, seqlen=T, seed=seed, tokens=n * T)
    return Calibration(windows, desc, positions)


def _formats(formats: str | list | None) -> list[Format]:
    if formats is None:
        return list(default_candidates())
    if isinstance(formats, str):
        names = [f for f in re.split(r"[,\s]+", formats) if f]
        if names == ["default"]:
            return list(default_candidates())
        formats = names
    out = [get_format(f) for f in formats]
    if not out:
        raise BitplanError("--formats names no format")
    return out


def split_halves(n: int, seed: int, how: str = DEFAULT_HALVES,
                 positions: torch.Tensor | None = None) -> tuple[list[int], list[int]]:
    """Window indices of halves a and b, each in window order: a seeded split ("random"), or the windows that
    start earliest in the source against the rest ("contiguous", by `positions`; row order without them)."""
    if how == "random":
        order = torch.randperm(n, generator=generator(seed, "halves")).tolist()
    elif how == "contiguous":
        order = list(range(n)) if positions is None else torch.argsort(positions, stable=True).tolist()
    else:
        raise BitplanError(f"--halves must be one of {', '.join(HALF_SPLITS)}, got {how!r}")
    return sorted(order[: n // 2]), sorted(order[n // 2:])


@contextmanager
def _progress(enabled: bool) -> Iterator[Progress | None]:
    if not enabled:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as p:
        yield p


class _Bar:
    def __init__(self, progress: Progress | None, description: str, total: int, done: int = 0):
        self.p = progress
        self.task = progress.add_task(description, total=total, completed=done) if progress else None

    def advance(self, n: int = 1) -> None:
        if self.p is not None:
            self.p.advance(self.task, n)


def profile_model(model: str | Path | LoadedModel | nn.Module, calib: str | Path | torch.Tensor,
                  samples: int | None = None, seqlen: int | None = None, seed: int = 0,
                  out_dir: str | Path | None = None, *, sketch_chunk: int = DEFAULT_CHUNK,
                  noise_samples: int = DEFAULT_NOISE_SAMPLES, noise_levels: tuple[float, ...] = DEFAULT_LEVELS,
                  formats: str | list | None = None, batch_size: int = 4, checkpoint_every: int = 64,
                  factor_groups: int = 1, halves: str = DEFAULT_HALVES,
                  judge_samples: int | None = None,
                  overwrite: bool = False, progress: bool = True, keep_job: bool = False,
                  events: Events | None = None, ranks: Ranks | None = None) -> Profile:
    """Profile `model` on calibration text (a .txt/.jsonl path or hf:NAME) or token ids [windows, seqlen].

    Writes OUT/profile.json, OUT/sensitivity.csv and OUT/hessians/; resumes an interrupted run of the same
    settings in OUT; returns an existing finished profile of the same settings without recomputing.
    `judge_samples` > 0 adds a judge of that many windows sampled from the model itself (judge.py): the
    forecast for text unlike the calibration, in each record's `*_judged` figures; 0 goes without; None (the
    default) is DEFAULT_JUDGE_SAMPLES for a model that names a BOS or EOS token, and no judge (with a note) for
    one that names neither.
    `events(phase, count)` is called after each checkpoint or per-layer result (tests interrupt through it).
    Under torchrun every process calls this with the same arguments and the work is split (bitplan.distributed);
    `ranks` defaults to the group torchrun set up, or a single process.
    """
    ranks = ranks or Ranks.current()
    progress = progress and ranks.main
    loaded = _resolve_model(model)
    net = loaded.model
    infos = find_linears(net)
    extras = find_extras(net)
    fmts = _formats(formats)
    cal = _calibration(loaded, calib, samples, seqlen, seed)
    n_windows, T = cal.windows.shape
    split = split_halves(n_windows, seed, halves, cal.positions)
    if not 1 <= sketch_chunk <= T:
        raise BitplanError(f"--sketch-chunk must be between 1 and the window length {T}, got {sketch_chunk}")
    if not 0 <= noise_samples <= n_windows:
        raise BitplanError(f"--noise-samples must be between 0 and --samples ({n_windows}), got {noise_samples}")
    if batch_size < 1 or checkpoint_every < 1:
        raise BitplanError("batch size and checkpoint interval must be positive")
    if judge_samples is None:
        judge_samples = DEFAULT_JUDGE_SAMPLES if find_start_token(net, loaded.tokenizer) is not None else 0
        if not judge_samples and progress:
            Console(stderr=True).print("[yellow]no judge from the model's own samples: the model names no BOS or "
                                       "EOS token to start them from (the forecast is the calibration halves' "
                                       "alone)[/]")
    if judge_samples < 0:
        raise BitplanError(f"--judge-samples must be 0 (no judge) or a number of windows, got {judge_samples}")
    levels = tuple(float(x) for x in noise_levels)

    sha = weights_sha256(net)
    identity = {"weights_sha256": sha, "model_id": loaded.model_id}
    fingerprint = {"weights_sha256": sha, "calibration_sha256": cal.description["sha256"], "samples": n_windows,
                   "seqlen": T, "seed": seed, "sketch_chunk": sketch_chunk, "halves": halves, "noise_samples": noise_samples,
                   "noise_levels": list(levels), "ldl_block": LDL.block, "ldl_sigma": LDL.sigma}
    out = Path(out_dir) if out_dir is not None else default_out_dir(loaded.model_id)
    layer_groups(infos, factor_groups)  # a bad count fails before any work
    options = {"batch_size": batch_size, "checkpoint_every": checkpoint_every, "factor_groups": factor_groups}
    # Rank 0 checks, clears or creates the folder before the others open it (and never clear it again).
    job, complete = ranks.on_main(lambda: Job.open(out, identity, fingerprint, options, overwrite),
                                  lambda: Job.open(out, identity, fingerprint, options, False))
    emit = events or (lambda phase, count: None)
    judge = {"samples": judge_samples, "seqlen": T, "seed": seed, "sketch_chunk": sketch_chunk}

    def with_judge(p: Profile) -> Profile:
        if not judge_samples or p.extra.get("judge", {}).get("settings") == judge:
            return p
        return ranks.on_main(lambda: _judge_phase(p, out, loaded, infos, judge, batch_size, progress, emit),
                             lambda: load_profile(out))

    if complete:
        existing = load_profile(out)
        if existing.formats != [f.name for f in fmts]:
            existing = ranks.on_main(lambda: _update_formats(existing, out, net, fmts, progress, emit=emit),
                                     lambda: load_profile(out))
        return with_judge(existing)
    console = Console(stderr=True)
    if progress and job.resumed:
        console.print(f"[dim]resuming the profile job in {job.dir}[/]")
    sketch_times = SketchTimes()

    def add_time(phase: str, seconds: float) -> dict[str, float]:
        return job.add_time(phase, seconds) if ranks.main else {}  # rank 0's clock stands for the job's

    with _progress(progress) as bars:
        t0 = time.perf_counter()
        noise = _noise_phase(job, net, infos, cal.windows[:noise_samples], levels, seed, bars, emit, ranks)
        add_time("noise", time.perf_counter() - t0)
        t0 = time.perf_counter()
        _factor_phase(job, net, infos, cal.windows, split, seed, sketch_chunk, bars, emit, sketch_times, ranks)
        add_time("factors.forward_backward", sketch_times.forward_backward)
        add_time("factors.accumulate", sketch_times.accumulate)
        add_time("factors", time.perf_counter() - t0)
        t0 = time.perf_counter()
        layer_results = _layer_phase(job, net, infos, bars, emit, ranks)
        add_time("layers", time.perf_counter() - t0)
        t0 = time.perf_counter()
        rel_errs = _format_phase(job, net, infos, fmts, bars, emit, ranks)
        timing = add_time("formats", time.perf_counter() - t0)
    if not ranks.main:
        ranks.barrier()  # rank 0 writes the profile
        return with_judge(load_profile(out))

    records = [_layer_record(i, layer_results[i.name], noise.get(i.name), rel_errs[i.name]) for i in infos]
    params = {id(p): p.numel() for p in net.parameters()}
    calibration = dict(cal.description, halves={"split": halves, "a": len(split[0]), "b": len(split[1])},
                       noise_samples=noise_samples, noise_tokens=noise_samples * T)
    profile = Profile(
        model={"id": loaded.model_id, "spec": loaded.spec, "weights_sha256": sha,
               "architecture": type(net).__name__, "n_params": sum(params.values()),
               "block_linear_params": sum(i.params for i in infos), "dtype": str(next(net.parameters()).dtype)},
        calibration=calibration,
        formats=[f.name for f in fmts], layers=records, extras=extras,
        settings={"sketch_chunk": sketch_chunk, "labels": "sampled from the model's output distribution",
                  "halves": (f"{halves} split of the calibration windows"
                             + (" (by where they start in the source)" if halves == "contiguous" else " (seeded)")
                             + "; factors kept per half"),
                  "noise_levels": list(levels), "noise_samples": noise_samples, "ldl_block": LDL.block,
                  "ldl_sigma": LDL.sigma, "dkl_unit": "mean per-token KL(original ‖ quantized), nats",
                  "fingerprint": fingerprint, **job.options},
        extra={"versions": _versions(), "timing_s": {k: round(v, 2) for k, v in timing.items()},
               "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
               "torch_threads": torch.get_num_threads(), "processes": ranks.world,
               "format_table": _format_table(fmts)})
    from .report import write_csv

    profile.save(out / "profile.json")
    write_csv(profile, out / "sensitivity.csv")
    job.finish(keep_job)
    ranks.barrier()
    return with_judge(profile)   # every rank: rank 0 judges while the others wait for it


def _layer_record(info, res: dict, fit: dict | None, rel_err: dict[str, float]) -> LayerRecord:
    return LayerRecord(
        name=info.name, block=info.block, kind=info.kind, shape=(info.out_features, info.in_features),
        weight_sq_norm=res["weight_sq_norm"], trace_h_in=res["trace_h_in"], trace_h_out=res["trace_h_out"],
        alpha_noise=fit["alpha"] if fit else None, alpha_noise_r2=fit["r2"] if fit else None,
        alpha_hessian=res["alpha_hessian"], alpha_yaqa=res["alpha_yaqa"],
        alpha_yaqa_heldout=res["alpha_yaqa_heldout"], rel_err=rel_err,
        extra={"n_samples": res["samples"], "tokens": res["tokens"],
               "grad_sq_per_sample": res["grad_sq_per_sample"], "grad_sq_per_token": res["grad_sq_per_token"],
               "kron_scale_c": res["c"], "alpha_shaped": res["alpha_shaped"], "yaqa_gain": res["yaqa_gain"], "yaqa_gain_heldout": res["yaqa_gain_heldout"],
               "yaqa_gain_heldout_raw": res["yaqa_gain_heldout_raw"], "ldlq_gain_heldout": res["ldlq_gain_heldout"],
               **{k: res.get(k) for k in ("shrink_out", "shrink_in", "shrink_target", "shrink_gains",
                                          "shrink_in_gains")},
               "ldl_sigma_in": res["sigma_in"], "ldl_sigma_out": res["sigma_out"],
               **({"noise_t2": fit["t2"], "noise_dkl": fit["dkl"]} if fit else {})})


def _format_table(fmts: list[Format]) -> dict[str, dict]:
    return {f.name: {"mse_q": f.mse_q, "nominal_bits": f.nominal_bits} for f in fmts}


def _update_formats(profile: Profile, out: Path, net: nn.Module, fmts: list[Format], progress: bool,
                    emit: Events) -> Profile:
    """A finished profile asked for with another candidate list: measure the formats it lacks, keep the rest."""
    from .report import write_csv

    t0 = time.perf_counter()
    with _progress(progress) as bars:
        bar = _Bar(bars, "format errors", len(profile.layers))
        for k, rec in enumerate(profile.layers):
            missing = [f for f in fmts if f.name not in rec.rel_err]
            if missing:
                W = get_module(net, rec.name).weight.detach()
                rec.rel_err.update(relative_errors(W, rec.name, missing))
            rec.rel_err = {f.name: rec.rel_err[f.name] for f in fmts}
            bar.advance()
            emit("formats", k + 1)
    profile.formats = [f.name for f in fmts]
    profile.extra["format_table"] = _format_table(fmts)
    timing = profile.extra.setdefault("timing_s", {})
    timing["formats"] = round(timing.get("formats", 0.0) + time.perf_counter() - t0, 2)
    profile.save(out / "profile.json")
    write_csv(profile, out / "sensitivity.csv")
    return profile


def _judge_phase(profile: Profile, out: Path, loaded: LoadedModel, infos, judge: dict, batch_size: int,
                 progress: bool, emit: Events) -> Profile:
    """Sample the judge's windows, accumulate their factors (hessians/judge/), judge every layer's fit under
    them, and rewrite profile.json and sensitivity.csv. Runs on a finished profile; every file is replaced
    atomically, so a killed run leaves the profile as it was. The judge's folder is complete when its
    settings.json is written: then it is reused (the samples and their factors depend only on the model and the
    judge's settings), and only the judging is redone."""
    folder = out / HESSIAN_DIR / JUDGE
    settings = {**judge, "weights_sha256": profile.model["weights_sha256"]}
    marker = folder / "settings.json"
    t0 = time.perf_counter()
    with _progress(progress) as bars:
        if not (marker.is_file() and read_json(marker, "judge settings") == settings):
            marker.unlink(missing_ok=True)
            _judge_factors(out, loaded, infos, judge, batch_size, bars, emit)
            write_json(marker, settings)
        bar = _Bar(bars, "judge: judging each layer's fit", len(infos))
        for k, rec in enumerate(profile.layers):
            g = judge_layer(out, rec)
            rec.extra.update(alpha_shaped_judge=g.alpha_shaped, yaqa_gain_judged=g.yaqa,
                             yaqa_gain_judged_raw=g.yaqa_raw, ldlq_gain_judged=g.ldlq)
            bar.advance()
            emit("judge", k + 1)
    profile.extra["judge"] = {"settings": judge, "tokens": judge["samples"] * judge["seqlen"],
                              "source": "the model's own samples: temperature 1 from its BOS token"}
    profile.extra.setdefault("timing_s", {})["judge"] = round(time.perf_counter() - t0, 2)
    from .report import write_csv

    profile.save(out / "profile.json")
    write_csv(profile, out / "sensitivity.csv")
    return profile


def judge_layer(out: Path, rec: LayerRecord) -> JudgedGains:
    """Layer `rec`'s fit as `apply --shrink auto` makes it (both halves, its λs and shrinkage target), judged under
    the judge's factors in OUT/hessians/judge/."""
    sums, _ = read_half_factors(factors_path(out, rec.name, JUDGE))
    return judged_gains(load_factors(out, rec.name), sums, rec.weight_sq_norm, rec.extra.get("shrink_out") or 0.0,
                        rec.extra.get("shrink_in") or 0.0, ldl=LDL,
                        target=rec.extra.get("shrink_target") or DEFAULT_SHRINK_TARGET)


def _judge_factors(out: Path, loaded: LoadedModel, infos, judge: dict, batch_size: int, bars,
                   emit: Events) -> None:
    """The judge's windows (and their text, for people to read) and every layer's factors on them."""
    net, folder = loaded.model, out / HESSIAN_DIR / JUDGE
    n, T, seed, chunk = judge["samples"], judge["seqlen"], judge["seed"], judge["sketch_chunk"]
    start = start_token(net, loaded.tokenizer)
    bar = _Bar(bars, "judge: sampling from the model", n)
    windows = sample_windows(net, n, T, start, seed, bar.advance)
    if loaded.tokenizer is not None:
        with atomic_path(folder / "samples.jsonl") as tmp:
            Path(tmp).write_text("".join(json.dumps({"id": f"judge-{w}", "text": loaded.tokenizer.decode(ids[1:])})
                                         + "\n" for w, ids in enumerate(windows.tolist())))
    modules = {i.name: get_module(net, i.name) for i in infos}
    # judging reads the factors and Σ‖G_c‖² only: no Σxxᵀ, no window sums
    sums = {i.name: FactorSums.zeros(i.out_features, i.in_features, moments=False) for i in infos}
    bar = _Bar(bars, "judge: factors", n)
    for s in range(0, n, batch_size):
        idx = list(range(s, min(n, s + batch_size)))
        accumulate_batch(net, modules, windows[idx], [JUDGE_WINDOW_OFFSET + w for w in idx], seed, chunk, sums,
                         moments=False)
        bar.advance(len(idx))
        emit("judge-factors", idx[-1] + 1)
    for info in infos:
        save_half_factors(factors_path(out, info.name, JUDGE), info.name, JUDGE, sums.pop(info.name), chunk)


def _versions() -> dict[str, str]:
    import transformers

    return {"bitplan": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _deal_unfinished(job: Job, kind: str, infos, ranks: Ranks) -> tuple[list, int]:
    """(this rank's share of the layers without a `kind` result, how many have one). Every rank lists them before
    the barrier: one listing after it could see another rank's new results and deal the rest differently."""
    left = [i for i in infos if job.result(kind, i.name) is None]
    ranks.barrier()
    return ranks.share(left), len(infos) - len(left)


def _noise_phase(job: Job, net: nn.Module, infos, windows: torch.Tensor, levels, seed: int, bars,
                 emit: Events, ranks: Ranks) -> dict[str, dict]:
    """Layer-parallel across ranks: each measures its share of the layers on all noise windows."""
    if not windows.shape[0]:
        return {}
    todo, done = _deal_unfinished(job, "noise", infos, ranks)
    if todo:
        bar = _Bar(bars, "noise injection", len(todo))
        cache = build_cache(net, windows, job.options["batch_size"])
        meter = NoiseMeter(net, cache, levels, seed)
        for k, info in enumerate(todo):
            job.save_result("noise", info.name, asdict(meter.measure(info.name, info.block)))
            bar.advance()
            emit("noise", done + k + 1)
    ranks.barrier()
    return {i.name: job.result("noise", i.name) for i in infos}


def layer_groups(infos: list, groups: int) -> list[list]:
    """`groups` contiguous runs of the layers, as equal in size as possible."""
    if not 1 <= groups <= len(infos):
        raise BitplanError(f"--factor-groups must be between 1 and the number of layers ({len(infos)}), got {groups}")
    bounds = [round(k * len(infos) / groups) for k in range(groups + 1)]
    return [infos[bounds[k]:bounds[k + 1]] for k in range(groups)]


def _factor_phase(job: Job, net: nn.Module, infos, windows: torch.Tensor, split: tuple[list[int], list[int]],
                  seed: int, chunk: int, bars,
                  emit: Events, times: SketchTimes, ranks: Ranks) -> None:
    """One half after the other: only one half's float64 sums are ever in memory, and with `factor_groups` = G
    only one group's (the calibration is then run G times per half, each time for 1/G of the layers).

    Across ranks the batches (the same ones a single process makes) are dealt round-robin, and after every batch
    each layer's statistics are reduced onto the rank that owns the layer, which alone keeps its float64 sums:
    memory per rank is the model plus 1/(world·G) of the factors. Every rank takes part in every step's
    reductions; one that has run out of windows re-runs a batch and sends zeros."""
    owner = {i.name: ranks.owner(k) for k, i in enumerate(infos)}
    bs = job.options["batch_size"]
    every = max(1, job.options["checkpoint_every"] // (bs * ranks.world))  # in steps
    groups = layer_groups(infos, job.options.get("factor_groups", 1))
    for half, idx in zip(HALVES, split):
        if job.half_done(half):
            continue
        batches = [idx[s:s + bs] for s in range(0, len(idx), bs)]
        mine = ranks.share(batches)
        steps = -(-len(batches) // ranks.world)
        for g, group in enumerate(groups):
            part = f".g{g}of{len(groups)}" if len(groups) > 1 else ""
            if part and job.half_done(half, part):
                continue
            tag = part + (f".rank{ranks.rank}of{ranks.world}" if ranks.distributed else "")
            owned = {i.name: (i.out_features, i.in_features) for i in group if owner[i.name] == ranks.rank}
            modules = {i.name: get_module(net, i.name) for i in group}
            state = job.load_half(half, owned, tag)
            label = f"factors, half {half}" + (f", layers {g + 1}/{len(groups)}" if part else "")
            bar = _Bar(bars, label, sum(len(b) for b in mine), sum(len(b) for b in mine[:state.next_batch]))
            for k in range(state.next_batch, steps):
                real = k < len(mine)
                batch = mine[k] if real else batches[0]
                sink = _reduce_to_owner(ranks, owner, state.layers, real) if ranks.distributed else None
                accumulate_batch(net, modules, windows[batch], batch, seed, chunk, state.layers, times, sink=sink)
                state.next_batch = k + 1
                bar.advance(len(batch) if real else 0)
                if state.next_batch % every == 0 and state.next_batch < steps:
                    job.save_half(state, tag)
                    emit(f"factors-{half}", state.next_batch)
            for info in group:
                if info.name in owned:
                    save_half_factors(factors_path(job.out, info.name, half), info.name, half,
                                      state.layers[info.name], chunk)
            del state
            ranks.barrier()
            if ranks.main and part:
                job.mark_half_done(half, part)
            ranks.barrier()
        if ranks.main:
            job.mark_half_done(half)
        ranks.barrier()
        emit(f"factors-{half}-done", steps)


def _reduce_to_owner(ranks: Ranks, owner: dict[str, int], sums: dict[str, FactorSums], real: bool):
    """A sketch sink that sums one batch's statistics over the ranks onto the layer's owner (zeros from a rank
    whose batch is only a stand-in). Hooks fire in the same order on every rank, so the collectives match."""
    def sink(name: str, stats: ChunkStats, tokens: int, xtx: torch.Tensor) -> None:
        counts = torch.tensor([stats.grad_sq, stats.samples, tokens, stats.window_grad_sq], dtype=torch.float64)
        # float64, as the sums are kept: a float32 sum of the ranks' parts would differ from one process by ~1e-7
        parts = [stats.h_out.double(), stats.h_in.double(), xtx.to(torch.float64, copy=True), counts]
        for t in parts:
            if not real:
                t.zero_()
            ranks.reduce_sum(t, owner[name])
        if owner[name] == ranks.rank:
            h_out, h_in, xtx_sum, counts = parts
            sums[name].add(ChunkStats(h_out, h_in, float(counts[0]), int(counts[1]), float(counts[3])),
                           tokens=int(counts[2]), xtx=xtx_sum)
    return sink


def _layer_phase(job: Job, net: nn.Module, infos, bars, emit: Events, ranks: Ranks) -> dict[str, dict]:
    """Layer-parallel across ranks (each reads the factor files the factor phase wrote)."""
    todo, done = _deal_unfinished(job, "layers", infos, ranks)
    bar = _Bar(bars, "coefficients (block LDL)", len(todo))
    for k, info in enumerate(todo):
        f = load_factors(job.out, info.name)
        W = get_module(net, info.name).weight.detach()
        wsq = float(W.double().pow(2).sum())
        coef = layer_coefficients(f, wsq, ldl=LDL)
        job.save_result("layers", info.name, {"weight_sq_norm": wsq, "samples": f.samples, "tokens": f.tokens,
                                              **asdict(coef)})
        bar.advance()
        emit("layers", done + k + 1)
    ranks.barrier()
    return {i.name: job.result("layers", i.name) for i in infos}


def _format_phase(job: Job, net: nn.Module, infos, fmts: list[Format], bars, emit: Events,
                  ranks: Ranks) -> dict[str, dict]:
    """Relative error of every layer in every candidate format, layer-parallel across ranks. Results are kept
    per layer for all formats ever asked for in this job, so a resumed job with another --formats list measures
    only what it lacks."""
    mine = ranks.share(list(enumerate(infos)))
    bar = _Bar(bars, "format errors", len(mine))
    for k, info in mine:
        known = job.result("formats", info.name) or {}
        missing = [f for f in fmts if f.name not in known]
        if missing:
            W = get_module(net, info.name).weight.detach()
            known.update(relative_errors(W, info.name, missing))
            job.save_result("formats", info.name, known)
            emit("formats", k + 1)
        bar.advance()
    ranks.barrier()
    return {i.name: {f.name: job.result("formats", i.name)[f.name] for f in fmts} for i in infos}
