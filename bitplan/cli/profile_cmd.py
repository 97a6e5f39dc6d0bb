"""`bitplan profile`: Kronecker-factored Hessians, linearity coefficients and the sensitivity report of a model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..data import BUILTIN_TEXTS, DEFAULT_CALIBRATION
from ..profile.defaults import (DEFAULT_CHUNK, DEFAULT_HALVES, DEFAULT_JUDGE_SAMPLES, DEFAULT_NOISE_SAMPLES,
                                DEFAULT_SAMPLES, DEFAULT_SEQLEN, HALF_SPLITS)
from . import app, console, err_console, print_table


@app.command("profile")
def profile_command(
    model: str = typer.Argument("smollm2-135m", help="folder, .gguf file, cached hub id or built-in name"),
    calib: str = typer.Option(DEFAULT_CALIBRATION, "--calib", "-c", help="calibration text: a built-in name "
                              f"({', '.join(BUILTIN_TEXTS)}), .txt, .jsonl (field \"text\"), either as .xz or .gz, "
                              "or hf:NAME[:CONFIG[:SPLIT]]"),
    samples: int = typer.Option(DEFAULT_SAMPLES, "--samples", "-n", help="calibration windows (split into two halves, see --halves)"),
    seqlen: int = typer.Option(DEFAULT_SEQLEN, "--seqlen", "-t", help="tokens per window"),
    seed: int = typer.Option(0, "--seed", help="seeds the windows, the halves, the sampled labels and the noise"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output directory (default ./profile-<model id>)"),
    sketch_chunk: int = typer.Option(DEFAULT_CHUNK, "--sketch-chunk", help="tokens per factor sample T' (1 = per token, seqlen = YAQA sketch B)"),
    halves: str = typer.Option(DEFAULT_HALVES, "--halves", help=f"how the windows are split into the two halves that "
                               f"choose λ and cross-fit the forecasts: {' or '.join(HALF_SPLITS)} (first half of the "
                               "source text against the second)"),
    formats: str = typer.Option("default", "--formats", help="candidate formats, comma-separated, or 'default'"),
    noise_samples: int = typer.Option(DEFAULT_NOISE_SAMPLES, "--noise-samples", help="calibration windows used for noise injection (0 skips α_noise)"),
    batch_size: int = typer.Option(4, "--batch-size", help="windows per forward/backward pass (memory vs speed; results do not depend on it)"),
    checkpoint_every: int = typer.Option(64, "--checkpoint-every", help="windows between checkpoints of the running "
                                         "factor sums (each writes a half's float64 sums: 3.5 GB for smollm2-135m)"),
    factor_groups: Optional[int] = typer.Option(None, "--factor-groups", show_default=False,
                                                help="run the calibration G times, each for 1/G of the layers: the "
                                                "factor sums take 1/G of the memory (same result, G × the passes; "
                                                "default: the smallest G whose resource plan fits the free memory)"),
    judge_samples: Optional[int] = typer.Option(None, "--judge-samples", show_default=False,
                                                help="forecast for text unlike the calibration: judge each layer's fit "
                                                f"on this many windows sampled from the model itself (default "
                                                f"{DEFAULT_JUDGE_SAMPLES}, the number measured, for a model that names "
                                                "a BOS or EOS token; 0: none; costs sampling and one factor pass over "
                                                "them; a finished profile asked for another gets only the judge)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a profile or job of other settings in --out"),
    keep_job: bool = typer.Option(False, "--keep-job", help="keep OUT/.job (per-layer intermediate results) after finishing"),
    threads: int = typer.Option(0, "--threads", help="CPU threads for torch (0: torch's default); on a machine shared "
                                "with other jobs, 1 avoids oversubscription"),
    device: str = typer.Option("auto", "--device", help="where every phase computes: auto (the first CUDA device, "
                               "else the CPU), cpu, cuda or cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="the model's weights' dtype there: auto (the checkpoint's on a "
                              "GPU, float32 on the CPU), float32, bfloat16 or float16; factor sums, coefficients and "
                              "format errors stay float32/float64"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resource plan (memory per process, hessians/ "
                                 "disk, factor groups, each phase's time as a multiple of one forward+backward) "
                                 "from the model's config.json, without loading weights, and stop"),
) -> None:
    """Profile a model: what each block linear layer costs in KL per unit of quantization error.

    Interrupted runs resume: run the same command again."""
    check_settings(samples=samples, seqlen=seqlen, sketch_chunk=sketch_chunk, halves=halves,
                   noise_samples=noise_samples, batch_size=batch_size, checkpoint_every=checkpoint_every,
                   factor_groups=1 if factor_groups is None else factor_groups, judge_samples=judge_samples,
                   threads=threads)
    from ..distributed import Ranks
    from ..errors import BitplanError
    from ..resources import plan_table, profile_job

    try:
        plan, refusal = profile_job(model, samples=samples, seqlen=seqlen, batch_size=batch_size,
                                    factor_groups=factor_groups, noise_samples=noise_samples,
                                    judge_samples=judge_samples, sketch_chunk=sketch_chunk,
                                    checkpoint_every=checkpoint_every, formats=formats, device=device, dtype=dtype)
    except BitplanError:
        if dry_run:
            raise
        plan, refusal = None, None   # no config.json to plan from: loading the model says what is wrong
    if dry_run:
        print_table(plan_table(plan), console)
        if refusal:
            console.print(f"[yellow]would not fit: {refusal}[/]", soft_wrap=True)
        return
    from ..devices import resolve_device, resolve_dtype

    resolve_dtype(dtype, resolve_device(device))  # a bad --device or --dtype fails before the model loads
    if plan is not None and Ranks.current().main:
        print_table(plan_table(plan), err_console)
    if refusal:
        raise BitplanError(refusal)
    factor_groups = plan.factor_groups if plan is not None else (factor_groups or 1)
    if out is not None:
        from ..io import check_writable

        check_writable(out, "folder", "profile folder")
    from ..profile import default_out_dir, profile_model
    from ..profile.report import sensitivity_table, summary_line

    if threads > 0:
        import torch

        torch.set_num_threads(threads)

    profile = profile_model(model, calib, samples, seqlen, seed, out, sketch_chunk=sketch_chunk,
                            noise_samples=noise_samples, formats=formats, batch_size=batch_size,
                            checkpoint_every=checkpoint_every, factor_groups=factor_groups, halves=halves,
                            judge_samples=judge_samples, overwrite=overwrite, keep_job=keep_job,
                            device=device, dtype=dtype)
    from ..distributed import Ranks

    if not Ranks.current().main:  # under torchrun, rank 0 reports
        return
    print_table(sensitivity_table(profile), console)
    where = out if out is not None else default_out_dir(profile.model["id"])
    console.print(f"[bold]{profile.model['id']}[/]: {summary_line(profile)}")
    timing = profile.extra.get("timing_s", {})
    if timing:
        console.print("[dim]time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timing.items())
                      + f"; peak memory {profile.extra.get('peak_rss_gb', 0):.2f} GB; wrote {where}[/]")


def check_settings(*, samples: int, seqlen: int, sketch_chunk: int, halves: str, noise_samples: int,
                   batch_size: int, checkpoint_every: int, factor_groups: int, judge_samples: int | None,
                   threads: int) -> None:
    """The options that need no model, checked before it loads (half a minute for the default model); the
    profile checks them again against the windows it draws, which may be fewer than --samples."""
    from ..errors import BitplanError

    if samples < 2:
        raise BitplanError(f"--samples must be at least 2 (the windows are split into two halves), got {samples}")
    if seqlen < 2:
        raise BitplanError(f"--seqlen must be at least 2 tokens, got {seqlen}")
    if not 1 <= sketch_chunk <= seqlen:
        raise BitplanError(f"--sketch-chunk must be between 1 and the window length {seqlen}, got {sketch_chunk}")
    if halves not in HALF_SPLITS:
        raise BitplanError(f"--halves must be one of {', '.join(HALF_SPLITS)}, got {halves!r}")
    if not 0 <= noise_samples <= samples:
        raise BitplanError(f"--noise-samples must be between 0 and --samples ({samples}), got {noise_samples}")
    if batch_size < 1:
        raise BitplanError(f"--batch-size must be at least 1, got {batch_size}")
    if checkpoint_every < 1:
        raise BitplanError(f"--checkpoint-every must be at least 1, got {checkpoint_every}")
    if factor_groups < 1:
        raise BitplanError(f"--factor-groups must be at least 1, got {factor_groups}")
    if judge_samples is not None and judge_samples < 0:
        raise BitplanError(f"--judge-samples must be 0 (no judge) or a number of windows, got {judge_samples}")
    if threads < 0:
        raise BitplanError(f"--threads must be 0 (torch's default) or a number of threads, got {threads}")
