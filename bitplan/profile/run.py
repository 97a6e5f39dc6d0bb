"""`profile_model`: the whole profile of a model, resumable, written to an output directory.

The sequence: check the inputs (inputs.py), open or resume the job folder (job.py), run the phases noise,
factors, layers and formats (phases.py), write profile.json and sensitivity.csv (output.py), then, by default,
add the judge (judge_phase.py; `judge_samples` = 0 goes without).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from ..distributed import Ranks
from ..linalg import LDL
from ..models import LoadedModel, find_linears, find_outer, model_device, weights_sha256
from ..progress import Progress
from .defaults import DEFAULT_CHUNK, DEFAULT_HALVES, DEFAULT_NOISE_SAMPLES, DEFAULT_OUTER_WINDOWS
from .inputs import (calibration_windows, candidate_formats, check_finite, check_options, judge_size,
                     resolve_model, split_halves)
from .job import Job
from .judge_phase import judge_phase
from .noise import DEFAULT_LEVELS
from .output import assemble_profile, write_profile
from .phases import Events, Work, coefficient_phase, factor_phase, format_phase, layer_groups, noise_phase, \
    outer_phase, update_formats
from .schema import Profile, load_profile
from .sketch import SketchTimes


def default_out_dir(model_id: str) -> Path:
    return Path(f"profile-{re.sub(r'[^A-Za-z0-9._-]+', '-', model_id).strip('-') or 'model'}")


def profile_model(model: str | Path | LoadedModel | nn.Module, calib: str | Path | torch.Tensor,
                  samples: int | None = None, seqlen: int | None = None, seed: int = 0,
                  out_dir: str | Path | None = None, *, sketch_chunk: int = DEFAULT_CHUNK,
                  noise_samples: int = DEFAULT_NOISE_SAMPLES, noise_levels: tuple[float, ...] = DEFAULT_LEVELS,
                  formats: str | list | None = None, batch_size: int = 4, checkpoint_every: int = 64,
                  factor_groups: int = 1, halves: str = DEFAULT_HALVES,
                  judge_samples: int | None = None,
                  overwrite: bool = False, progress: bool = True, keep_job: bool = False,
                  events: Events | None = None, ranks: Ranks | None = None,
                  device: str | torch.device = "auto", dtype: str | torch.dtype = "auto") -> Profile:
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
    `device` and `dtype` (bitplan.devices: "auto" is the first CUDA device and the checkpoint's dtype there, else
    the CPU and float32) say where a model given by name or path is loaded and every phase computes; a model
    passed in memory is profiled where it is. docs/design.md, "Devices and precision", says what runs where.
    """
    ranks = ranks or Ranks.current()
    progress = progress and ranks.main
    loaded = resolve_model(model, device, dtype)
    net = loaded.model
    if model_device(net).type == "cuda":
        torch.cuda.set_device(model_device(net))   # NCCL's collectives under torchrun run on the current device
    infos = find_linears(net)
    check_finite(net, infos)
    fmts = candidate_formats(formats)
    cal = calibration_windows(loaded, calib, samples, seqlen, seed)
    n_windows, T = cal.windows.shape
    split = split_halves(n_windows, seed, halves, cal.positions)
    check_options(cal.windows, sketch_chunk, noise_samples, batch_size, checkpoint_every)
    judge_samples = judge_size(judge_samples, loaded, progress)
    levels = tuple(float(x) for x in noise_levels)
    layer_groups(infos, factor_groups)  # a bad count fails before any work

    sha = weights_sha256(net)
    identity = {"weights_sha256": sha, "model_id": loaded.model_id}
    fingerprint = {"weights_sha256": sha, "calibration_sha256": cal.description["sha256"], "samples": n_windows,
                   "seqlen": T, "seed": seed, "sketch_chunk": sketch_chunk, "halves": halves,
                   "noise_samples": noise_samples, "noise_levels": list(levels), "ldl_block": LDL.block,
                   "ldl_sigma": LDL.sigma}
    held = next(net.parameters()).dtype
    if held in (torch.bfloat16, torch.float16):
        # bf16 weights hash as their float32 upcast (weights_sha256), but their forward passes differ from a
        # float32 model's: such a profile is not a float32 one's to resume or reuse (float32 fingerprints unchanged)
        fingerprint["model_dtype"] = str(held).removeprefix("torch.")
    out = Path(out_dir) if out_dir is not None else default_out_dir(loaded.model_id)
    options = {"batch_size": batch_size, "checkpoint_every": checkpoint_every, "factor_groups": factor_groups}
    # Rank 0 checks, clears or creates the folder before the others open it (and never clear it again).
    # The lock and the clean-up of killed writes' temporaries are rank 0's: the others write under its lock.
    job, complete = ranks.on_main(lambda: Job.open(out, identity, fingerprint, options, overwrite),
                                  lambda: Job.open(out, identity, fingerprint, options, False, lock=False))
    compute = {"device": str(model_device(net)), "dtype": str(held).removeprefix("torch.")}
    try:
        return _run_job(job, complete, loaded, infos, fmts, cal, split, fingerprint, judge_samples, levels, seed,
                        sketch_chunk, noise_samples, batch_size, progress, keep_job, events, ranks, out, T, net,
                        compute)
    finally:
        job.unlock()


def _run_job(job, complete, loaded, infos, fmts, cal, split, fingerprint, judge_samples, levels, seed, sketch_chunk,
             noise_samples, batch_size, progress, keep_job, events, ranks, out, T, net, compute) -> Profile:
    """profile_model's work once the job folder is open (and, on rank 0, locked)."""
    emit = events or (lambda phase, count: None)
    judge = {"samples": judge_samples, "seqlen": T, "seed": seed, "sketch_chunk": sketch_chunk}

    def rewrite_on_main(add, p: Profile) -> Profile:
        """Rank 0 adds to a finished profile and rewrites it (`add(p, bars)`); the other ranks then read it."""
        def on_rank0() -> Profile:
            with Progress(progress) as bars:
                return add(p, bars)
        return ranks.on_main(on_rank0, lambda: load_profile(out))

    def with_judge(p: Profile) -> Profile:
        if not judge_samples or p.extra.get("judge", {}).get("settings") == judge:
            return p
        return rewrite_on_main(lambda p, bars: judge_phase(p, out, loaded, infos, judge, batch_size, bars, emit,
                                                           job.options.get("factor_groups", 1)), p)

    if complete:
        existing = load_profile(out)
        if existing.formats != [f.name for f in fmts]:
            existing = rewrite_on_main(lambda p, bars: update_formats(p, out, net, fmts, bars, emit, job), existing)
            if ranks.main:
                job.finish(keep_job)   # the per-layer errors it saved are in profile.json now
        return with_judge(existing)
    if progress and job.resumed:
        Console(stderr=True).print(f"[dim]resuming the profile job in {job.dir}[/]")

    def add_time(phase: str, seconds: float) -> dict[str, float]:
        return job.add_time(phase, seconds) if ranks.main else {}  # rank 0's clock stands for the job's

    # Each phase's time is added at every checkpoint or result, so a kill loses at most one step's.
    clock = job.clock(enabled=ranks.main)

    def emit_timed(phase: str, count: int) -> None:
        clock.tick()
        emit(phase, count)

    sketch_times = SketchTimes()
    with Progress(progress) as bars:
        work = Work(job, net, infos, ranks, bars, emit_timed, outer=find_outer(net))
        clock.start("noise")
        noise = noise_phase(work, cal.windows[:noise_samples], levels, seed)
        clock.start("factors")
        factor_phase(work, cal.windows, split, seed, sketch_chunk, sketch_times)
        clock.stop()
        add_time("factors.forward_backward", sketch_times.forward_backward)
        add_time("factors.accumulate", sketch_times.accumulate)
        clock.start("outer")
        outer = outer_phase(work, cal.windows[:DEFAULT_OUTER_WINDOWS], seed, split)
        clock.start("layers")
        results = coefficient_phase(work)
        clock.start("formats")
        rel_errs = format_phase(work, fmts)
        timing = clock.stop()
    if not ranks.main:
        ranks.barrier()  # rank 0 writes the profile
        return with_judge(load_profile(out))

    profile = write_profile(assemble_profile(loaded, infos, fmts, cal, split, fingerprint, job.options, results,
                                             noise, rel_errs, timing, ranks, job.peak_rss_gb(), work.outer, outer,
                                             compute=compute),
                            out)
    job.finish(keep_job)
    ranks.barrier()
    return with_judge(profile)   # every rank: rank 0 judges while the others wait for it
