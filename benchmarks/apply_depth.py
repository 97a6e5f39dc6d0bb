"""Apply's peak memory at a model's full depth, beside the model's float32 size and the resource plan's forecast.

    python benchmarks/apply_depth.py --config llama-3.2-1b --plan runs/scale-1b-4/plan.json --out runs/apply-1b

scale_bench.py runs the whole pipeline, but on a 2-core CPU only a model's first blocks fit in its time: the
profile's per-layer phases dominate. Apply does not read what those phases measure, only the factor files, so
this benchmark runs what apply needs at every block:
  1. builds the random-weight model (scale_bench.build_model) and times one plain forward+backward over the
     calibration (scale_bench.time_fb: the forecast's time unit);
  2. runs the profile's noise-free factor phase alone: `profile_model` stops once both halves' hessians/ files
     are written (its later phases are skipped; the job stays unfinished);
  3. gives every block linear layer a format: `--plan`'s format of the same layer in block b mod the plan's
     blocks (a plan solved for the first blocks, repeated), else `--formats` in turn; the embedding stays fp16;
  4. applies it (`apply_formats`, yaqa, one worker) in its own process and prints its wall time and peak
     resident memory (VmHWM) beside the model's float32 size and `apply_plan_resources`' forecast.
The profile's layer phase is what chooses each layer's λs; without it apply would choose them itself, from both
halves of every factor, a step (and a peak) a finished profile spares it. So λ of H_O is fixed (`--shrink`,
default 1.0, what the first 4 blocks' profile of Llama-3.2-1B's shape chose for most layers; H_I unshrunk), and
`--shrink auto` measures apply choosing them.
Apply's memory and time do not depend on the calibration's size (every factor is n×n), so a short calibration
serves. Each step's result is kept in OUT (model/, fb.json, prof/, q/, each step's peaks in peaks/); a rerun
skips the steps done.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.scale_bench import (SHAPES, build_model, load_config, run_child, run_recording_peaks,  # noqa: E402
                                    time_fb)


class _FactorsWritten(Exception):
    """Stops the profile once its factor phase is done."""


def factors_child(folder: str, prof: str, samples: str, seqlen: str, groups: str) -> None:
    from bitplan.data import DEFAULT_CALIBRATION
    from bitplan.profile import profile_model

    def stop(phase: str, count: int) -> None:
        if phase == "factors-b-done":
            raise _FactorsWritten

    try:
        profile_model(folder, DEFAULT_CALIBRATION, int(samples), int(seqlen), out_dir=prof, noise_samples=0,
                      judge_samples=0, formats="fp16", factor_groups=int(groups), keep_job=True, events=stop,
                      device="cpu", dtype="float32")
    except _FactorsWritten:
        pass


def apply_child(folder: str, prof: str, formats_json: str, out: str, shrink: str) -> None:
    from bitplan.apply.run import apply_formats

    formats = json.loads(Path(formats_json).read_text())
    apply_formats(folder, formats, out, rounding="yaqa", profile_dir=prof, shrink=shrink if shrink == "auto" else
                  float(shrink), workers=1, overwrite=True, device="cpu", dtype="float32")


def step(out: Path, name: str, argv: list[str], threads: int) -> dict:
    """This script in `--NAME` mode as a child process: wall time and peak resident memory (skipped when done)."""
    return run_child(out, name, [__file__, f"--{name}"], argv, threads, name, f"{name} {' '.join(argv)}")


def plan_formats(config: dict, plan: Path | None, formats: list[str]) -> dict[str, str]:
    """Each block linear layer's format: the plan's for the same layer kind of block b mod the plan's blocks, else
    `formats` in turn."""
    from bitplan.resources import ModelShape

    linears = ModelShape.from_config(config).linears()
    if plan is None:
        return {x.name: formats[k % len(formats)] for k, x in enumerate(linears)}
    given = {(lay["block"], lay["kind"]): lay["format"] for lay in json.loads(plan.read_text())["layers"]
             if lay["block"] >= 0}   # the embedding and the head are block -1
    blocks = 1 + max(b for b, _ in given)
    missing = sorted({(x.block % blocks, x.kind) for x in linears} - set(given))
    if missing:
        sys.exit(f"--plan gives no format to the {missing[0][1]} of block {missing[0][0]}")
    return {x.name: given[(x.block % blocks, x.kind)] for x in linears}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] in ("--factors", "--apply"):
        return run_recording_peaks(sys.argv[2], factors_child if sys.argv[1] == "--factors" else apply_child,
                                   *sys.argv[4:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help=f"{', '.join(SHAPES)} or a config.json")
    ap.add_argument("--blocks", type=int, default=None, help="keep only the first N decoder blocks")
    ap.add_argument("--plan", type=Path, default=None, help="a plan (plan.json) for the model's first blocks")
    ap.add_argument("--formats", default="int4-g128,higgs-p2-n64-g128", help="without --plan: formats in turn")
    ap.add_argument("--samples", type=int, default=2, help="calibration windows of the factors (two halves)")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--factor-groups", type=int, default=8)
    ap.add_argument("--shrink", default="1.0", help="λ of H_O, or auto: apply chooses both λs from the halves")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    folder = out / "model"
    build_model(load_config(args.config), args.blocks, folder, args.seed)
    fb = time_fb(folder, out, args.samples, args.seqlen, 4, "cpu", "float32", args.threads)
    fac = step(out, "factors", [str(folder), str(out / "prof"), str(args.samples), str(args.seqlen),
                                str(args.factor_groups)], args.threads)
    formats = plan_formats(json.loads((folder / "config.json").read_text()), args.plan, args.formats.split(","))
    (out / "formats.json").write_text(json.dumps(formats, indent=1))
    app = step(out, "apply", [str(folder), str(out / "prof"), str(out / "formats.json"), str(out / "q"),
                              args.shrink], args.threads)
    report(out, args, folder, formats, fb["seconds"], fac, app)


def report(out: Path, args, folder: Path, formats: dict[str, str], fb: float, fac: dict, app: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from bitplan.resources import ApplySettings, ModelShape, apply_plan_resources, dtype_bytes, fmt_bytes

    config = json.loads((folder / "config.json").read_text())
    shape = ModelShape.from_config(config, args.config)
    settings = ApplySettings(samples=args.samples, seqlen=args.seqlen, rounding="yaqa", workers=1,
                             dtype_bytes=dtype_bytes("float32", "cpu", config), device="cpu", processes=1,
                             choose_shrink=frozenset(formats if args.shrink == "auto" else ()))
    forecast = apply_plan_resources(shape, formats, settings)
    f32 = 4 * shape.params
    table = Table(title=f"apply of {args.config}{f', first {args.blocks} blocks' if args.blocks else ''} "
                        f"({shape.params / 1e9:.2f} B parameters, {fmt_bytes(f32)} in float32), "
                        f"{sum(f != 'fp16' for f in formats.values())} of {len(formats)} layers in yaqa, one "
                        f"worker; one forward+backward over {args.samples} × "
                        f"{args.seqlen} tokens {fb:.1f} s")
    for col in ("step", "wall", "forecast", "peak host", "forecast", "÷ forecast", "÷ half the float32 model"):
        table.add_column(col, justify="left" if col == "step" else "right")
    table.add_row("factors (2 halves)", f"{fac['wall_s']:.0f} s", "–", fmt_bytes(fac["host_bytes"]), "–", "–", "–")
    table.add_row("apply", f"{app['wall_s']:.0f} s", f"{forecast.times_fb * fb:.0f} s",
                  f"{app['host_bytes'] / 2 ** 30:.2f} GiB",
                  f"{forecast.host_bytes / 2 ** 30:.2f} GiB", f"{app['host_bytes'] / forecast.host_bytes:.2f}",
                  f"{app['host_bytes'] / (f32 / 2):.2f}")
    Console().print(table)
    (out / "results.json").write_text(json.dumps({
        "config": args.config, "blocks": args.blocks, "params": shape.params, "float32_bytes": f32,
        "layers": len(formats), "forward_backward_s": fb, "factors": fac, "apply": app,
        "apply_forecast_bytes": forecast.host_bytes, "apply_forecast_s": forecast.times_fb * fb},
        indent=2))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
