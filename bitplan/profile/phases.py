"""The four phases of a profile job, each resumable on its own from the job folder (job.py):

  noise    α_noise per layer by noise injection on the first calibration windows (the block linears, then the
           embedding and an untied head);
  factors  Kronecker factors of every block linear on the two calibration halves, one half after the other (only
           one half's float64 sums are in memory), checkpointed every few batches; each half's
           hessians/<half>/<layer>.safetensors as soon as the half is complete;
  layers   per layer: predicted coefficients from the factors (block LDL, held-out gains);
  outer    the embedding's and an untied head's α_hessian and traces: one forward/backward per window on the first
           DEFAULT_OUTER_WINDOWS calibration windows (outer.py), and the head input's second moment per half
           (hessians/<half>/<name>.safetensors, Σxxᵀ alone: the tied embedding's or the untied head's);
  formats  per layer: the relative error of every candidate format applicable to its shape (the candidate list is
           not part of the job's fingerprint: a finished profile asked for other formats measures only those,
           `update_formats`).

Under torchrun the processes split the work (bitplan.distributed): noise, layers and formats by layer, factors by
batch. Each phase lists the work left before its first barrier (see `deal_unfinished`) and ends with a barrier,
after which every process reads every layer's result from the job folder.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..distributed import Ranks
from ..errors import BitplanError
from ..formats import Format
from ..linalg import LDL
from ..models import LinearInfo, get_module, model_device
from ..progress import Progress
from .coefficients import layer_coefficients
from .factors import ChunkStats, FactorSums
from .hessians import HALVES, factors_path, load_factors, save_half_factors, save_input_moment
from .job import Job
from .noise import NoiseMeter, build_cache
from .output import applicable, format_table, set_inapplicable, write_profile
from .relerr import relative_errors
from .schema import Profile
from .sketch import SketchTimes, accumulate_batch

Events = Callable[[str, int], None]   # (phase, count) after each checkpoint or per-layer result


@dataclass
class Work:
    """What every phase works with: the job folder, the model and its block linears, this process's place among
    the ranks, where progress goes, and whom to tell of each result (tests interrupt through `emit`)."""
    job: Job
    net: nn.Module
    infos: list[LinearInfo]
    ranks: Ranks
    progress: Progress
    emit: Events
    outer: list[LinearInfo] = field(default_factory=list)   # the embedding and an untied head

    @property
    def all_infos(self) -> list[LinearInfo]:
        return self.infos + self.outer

    @property
    def device(self) -> torch.device:
        """Where the phases compute: the model's device."""
        return model_device(self.net)


def deal_unfinished(work: Work, kind: str, infos: list[LinearInfo] | None = None) -> tuple[list[LinearInfo], int]:
    """(this rank's share of the layers without a `kind` result, how many have one). Every rank lists them before
    the barrier: one listing after it could see another rank's new results and deal the rest differently."""
    infos = work.infos if infos is None else infos
    left = [i for i in infos if work.job.result(kind, i.name) is None]
    work.ranks.barrier()
    return work.ranks.share(left), len(infos) - len(left)


def noise_phase(work: Work, windows: torch.Tensor, levels: tuple[float, ...], seed: int) -> dict[str, dict]:
    """α_noise of every layer on `windows` (none: {}). Each rank measures its share of the layers on all of them."""
    if not windows.shape[0]:
        return {}
    job = work.job
    todo, done = deal_unfinished(work, "noise", work.all_infos)
    if todo:
        task = work.progress.task("noise injection", len(todo))
        meter = NoiseMeter(work.net, build_cache(work.net, windows, job.options["batch_size"]), levels, seed)
        for k, info in enumerate(todo):
            job.save_result("noise", info.name, asdict(meter.measure(info.name, info.block)))
            task.advance()
            work.emit("noise", done + k + 1)
    work.ranks.barrier()
    return {i.name: job.result("noise", i.name) for i in work.all_infos}


def outer_phase(work: Work, windows: torch.Tensor, seed: int,
                split: tuple[list[int], list[int]] | None = None) -> dict[str, dict]:
    """The embedding's and an untied head's α_hessian and traces (outer.py) on `windows`, rank 0's work (one
    result for them all, one pass over the windows). With `split` (the calibration halves' window indices; the
    windows are the calibration's first ones) the same pass writes the head input's second moment per half
    before the results, so a job killed between the two redoes both."""
    from .outer import InputMoment, outer_pass

    job = work.job
    if not work.outer:
        return {}
    left = [i for i in work.outer if job.result("outer", i.name) is None]
    work.ranks.barrier()
    if left and work.ranks.main:
        task = work.progress.task("embedding and head gradients", windows.shape[0])
        halves = None
        if split is not None:
            half_of = {k: h for h, idx in zip(HALVES, split) for k in idx}
            halves = [half_of[k] for k in range(windows.shape[0])]
        done = outer_pass(work.net, work.outer, windows, seed, task, halves)
        if done.moment_of is not None:
            info = next(i for i in work.outer if i.name == done.moment_of)
            for half in HALVES:
                m = done.moments.get(half) or InputMoment(torch.zeros(info.in_features, info.in_features,
                                                                      dtype=torch.float64))
                save_input_moment(factors_path(job.out, info.name, half), info.name, half, m.xtx, m.tokens,
                                  m.samples)
        for name, res in done.records.items():
            job.save_result("outer", name, res)
        work.emit("outer", len(work.outer))
    work.ranks.barrier()
    return {i.name: job.result("outer", i.name) for i in work.outer}


def layer_groups(infos: list, groups: int) -> list[list]:
    """`groups` contiguous runs of the layers, as equal in size as possible."""
    if not 1 <= groups <= len(infos):
        raise BitplanError(f"--factor-groups must be between 1 and the number of layers ({len(infos)}), got {groups}")
    bounds = [round(k * len(infos) / groups) for k in range(groups + 1)]
    return [infos[bounds[k]:bounds[k + 1]] for k in range(groups)]


def factor_phase(work: Work, windows: torch.Tensor, split: tuple[list[int], list[int]], seed: int, chunk: int,
                 times: SketchTimes) -> None:
    """One half after the other: only one half's float64 sums are ever in memory, and with `factor_groups` = G
    only one group's (the calibration is then run G times per half, each time for 1/G of the layers).

    Across ranks the batches (the same ones a single process makes) are dealt round-robin, and after every batch
    each layer's statistics are reduced onto the rank that owns the layer, which alone keeps its float64 sums:
    memory per rank is the model plus 1/(world·G) of the factors. Every rank takes part in every step's
    reductions; one that has run out of windows re-runs a batch and sends zeros."""
    job, ranks, net = work.job, work.ranks, work.net
    owner = {i.name: ranks.owner(k) for k, i in enumerate(work.infos)}
    bs = job.options["batch_size"]
    every = max(1, job.options["checkpoint_every"] // (bs * ranks.world))  # in steps
    groups = layer_groups(work.infos, job.options.get("factor_groups", 1))
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
            state = job.load_half(half, owned, tag, device=work.device)
            label = f"factors, half {half}" + (f", layers {g + 1}/{len(groups)}" if part else "")
            task = work.progress.task(label, sum(len(b) for b in mine), sum(len(b) for b in mine[:state.next_batch]))
            for k in range(state.next_batch, steps):
                real = k < len(mine)
                batch = mine[k] if real else batches[0]
                sink = reduce_to_owner(ranks, owner, state.layers, real) if ranks.distributed else None
                accumulate_batch(net, modules, windows[batch], batch, seed, chunk, state.layers, times, sink=sink)
                state.next_batch = k + 1
                task.advance(len(batch) if real else 0)
                if state.next_batch % every == 0 and state.next_batch < steps:
                    job.save_half(state, tag)
                    work.emit(f"factors-{half}", state.next_batch)
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
        work.emit(f"factors-{half}-done", steps)


def reduce_to_owner(ranks: Ranks, owner: dict[str, int], sums: dict[str, FactorSums], real: bool):
    """A sketch sink that sums one batch's statistics over the ranks onto the layer's owner (zeros from a rank
    whose batch is only a stand-in). Hooks fire in the same order on every rank, so the collectives match."""
    def sink(name: str, stats: ChunkStats, tokens: int, xtx: torch.Tensor) -> None:
        counts = torch.tensor([stats.grad_sq, stats.samples, tokens, stats.window_grad_sq], dtype=torch.float64,
                              device=stats.h_out.device)   # NCCL reduces device tensors only
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


def coefficient_phase(work: Work) -> dict[str, dict]:
    """Each layer's coefficients from the factor files the factor phase wrote (layer-parallel across ranks), in
    float64 on the model's device (CUDA's Cholesky and triangular solves take float64), one layer at a time."""
    job = work.job
    todo, done = deal_unfinished(work, "layers")
    task = work.progress.task("coefficients (block LDL)", len(todo))
    for k, info in enumerate(todo):
        f = load_factors(job.out, info.name, device=work.device)
        W = get_module(work.net, info.name).weight.detach()
        wsq = float(W.double().pow(2).sum())
        coef = layer_coefficients(f, wsq, ldl=LDL)
        job.save_result("layers", info.name, {"weight_sq_norm": wsq, "samples": f.samples, "tokens": f.tokens,
                                              **asdict(coef)})
        task.advance()
        work.emit("layers", done + k + 1)
    work.ranks.barrier()
    return {i.name: job.result("layers", i.name) for i in work.infos}


def format_phase(work: Work, fmts: list[Format]) -> dict[str, dict[str, float]]:
    """Relative error of every layer in every candidate format, layer-parallel across ranks. Results are kept
    per layer for all formats ever asked for in this job, so a resumed job with another --formats list measures
    only what it lacks."""
    job = work.job
    mine = work.ranks.share(list(enumerate(work.all_infos)))
    task = work.progress.task("format errors", len(mine))
    for k, info in mine:
        known = job.result("formats", info.name) or {}
        missing = [f for f in fmts if f.name not in known and applicable(f, info.shape)]
        if missing:
            W = get_module(work.net, info.name).weight.detach()
            known.update(relative_errors(W, info.name, missing))
            job.save_result("formats", info.name, known)
            work.emit("formats", k + 1)
        task.advance()
    work.ranks.barrier()
    return {i.name: {f.name: job.result("formats", i.name)[f.name] for f in fmts if applicable(f, i.shape)}
            for i in work.all_infos}


def update_formats(profile: Profile, out: Path, net: nn.Module, fmts: list[Format], progress: Progress,
                   emit: Events, job: Job | None = None) -> Profile:
    """A finished profile asked for with another candidate list: measure the formats it lacks, keep the rest.
    With the profile's `job`, each layer's errors are saved as they are measured (as format_phase saves them),
    so a killed update resumes at the layer it reached; the profile itself is rewritten once, at the end."""
    t0 = time.perf_counter()
    task = progress.task("format errors", len(profile.plannable))
    for k, rec in enumerate(profile.plannable):
        usable = [f for f in fmts if applicable(f, rec.shape)]
        known = {**rec.rel_err, **((job.result("formats", rec.name) or {}) if job is not None else {})}
        missing = [f for f in usable if f.name not in known]
        if missing:
            W = get_module(net, rec.name).weight.detach()
            known.update(relative_errors(W, rec.name, missing))
            if job is not None:
                job.save_result("formats", rec.name, known)
        rec.rel_err = {f.name: known[f.name] for f in usable}
        set_inapplicable(rec, fmts)
        task.advance()
        emit("formats", k + 1)
    profile.formats = [f.name for f in fmts]
    profile.extra["format_table"] = format_table(fmts)
    timing = profile.extra.setdefault("timing_s", {})
    timing["formats"] = round(timing.get("formats", 0.0) + time.perf_counter() - t0, 2)
    return write_profile(profile, out)
