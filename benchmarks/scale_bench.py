"""The whole pipeline on a random-weight model of a real model's shape, each phase beside the dry-run's forecast.

    python benchmarks/scale_bench.py --config llama-3.2-1b --blocks 4 --samples 8 --seqlen 256 --out runs/scale-1b

Builds a model from a config of that shape (`AutoModelForCausalLM.from_config`, nothing downloaded; `--blocks N`
keeps the first N decoder blocks) with the default model's tokenizer (its ids all lie inside these vocabularies),
times one plain forward+backward over the calibration, then runs `bitplan profile` → `solve` → `apply` → `eval`,
each as its own process, and prints per phase: wall time, that time as a multiple of the forward+backward, peak
resident memory (and peak device memory on a GPU), and the resource plan's forecast beside each (eval's, on a
CPU: what its offloading decision assumes it needs). The profile's own phases come from its timing. Every step's
result is kept in OUT (model/, fb.json, prof/, plan.json, q/, eval.json, each command's peaks in peaks/); a rerun
skips the steps already done. results.json holds the table.
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
CONFIGS = Path(__file__).resolve().parent / "configs"
SHAPES = ("llama-3.2-1b", "llama-3.1-8b", "llama-3.1-70b", "smollm2-135m")
GIB = 2 ** 30


def child(peaks_file: str, argv: list[str]) -> None:
    """Run `bitplan ARGV` in this process and write its peak resident (and device) memory, however it ends."""
    from bitplan.cli import main

    sys.argv = ["bitplan", *argv]
    run_recording_peaks(peaks_file, main)


def run_recording_peaks(peaks_file: str, fn, *args) -> None:
    """`fn(*args)`, then its exit status and this process's peak resident (and device) memory written to
    `peaks_file` as JSON, however it ends (an exception records exit 1, so a rerun does not take it as done)."""
    code = 1
    try:
        fn(*args)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        peaks = {"host_bytes": own_peak_bytes(), "exit": code}
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peaks["device_bytes"] = torch.cuda.max_memory_reserved()
        Path(peaks_file).write_text(json.dumps(peaks))
    sys.exit(code)


def own_peak_bytes() -> int:
    """This process's peak resident memory since it started: VmHWM. On Linux ru_maxrss keeps the parent's peak
    across fork and exec, so a step started by a bench that had just built the model reported the builder's
    memory (the default model's shape: apply 1.08 GiB, alone 0.69)."""
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_step(out: Path, name: str, argv: list[str], threads: int) -> dict:
    """`bitplan ARGV` as a child process (skipped when its peaks are already recorded): wall time and peaks."""
    return run_child(out, name, [__file__, "--child"], argv, threads, f"bitplan {argv[0]}", f"bitplan {' '.join(argv)}")


def run_child(out: Path, name: str, command: list[str], argv: list[str], threads: int, what: str, shown: str) -> dict:
    """`python COMMAND PEAKS -- ARGV` as a child process that writes its peaks to PEAKS (run_recording_peaks), with
    `threads` OpenMP threads, skipped when its peaks record a clean exit already: wall time and peaks."""
    peaks = out / "peaks" / f"{name}.json"
    if peaks.is_file() and json.loads(peaks.read_text()).get("exit") == 0:
        return json.loads(peaks.read_text())
    peaks.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    print(f"$ {shown}", flush=True)
    t0 = time.perf_counter()
    code = subprocess.call([sys.executable, *command, str(peaks), "--", *argv], env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if code != 0:
        sys.exit(f"{what} failed (exit {code}); fix it and rerun: finished steps are kept in {out}")
    data = {**json.loads(peaks.read_text()), "wall_s": wall}
    peaks.write_text(json.dumps(data))
    return data


def load_config(spec: str) -> dict:
    path = CONFIGS / f"{spec}.json" if spec in SHAPES else Path(spec)
    if not path.is_file():
        sys.exit(f"--config: {spec} is neither one of {', '.join(SHAPES)} nor a config.json")
    return json.loads(path.read_text())


def build_model(config: dict, blocks: int | None, folder: Path, seed: int) -> None:
    """A random-weight model of `config`'s shape (first `blocks` blocks) saved with the default model's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from bitplan.models import resolve_model_path

    if (folder / "config.json").is_file():
        return
    tok_dir = resolve_model_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if blocks:
        config["num_hidden_layers"] = min(blocks, config["num_hidden_layers"])
    if len(tok) > config["vocab_size"]:
        sys.exit(f"the default model's tokenizer has {len(tok)} ids, more than this vocabulary ({config['vocab_size']})")
    # the tokenizer's special ids, so that sampling and evaluation start where the tokenizer says
    config.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  dtype="float32", torch_dtype="float32")
    cfg = AutoConfig.for_model(**config)
    cfg.initializer_range = 0.02   # normal(0, 0.02): activations and logits of the size trained models have
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)


def time_fb(folder: Path, out: Path, samples: int, seqlen: int, batch: int, device: str, dtype: str,
            threads: int) -> dict:
    """One plain forward+backward over the calibration windows (frozen weights, sampled labels: the profile's
    passes without the factor hooks), in a child process."""
    path = out / "fb.json"
    if path.is_file():
        return json.loads(path.read_text())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, __file__, "--fb-child", str(folder), str(path), str(samples), str(seqlen), str(batch),
            device, dtype, str(threads)]
    if subprocess.call(args, env=env, cwd=REPO) != 0:
        sys.exit("timing the forward+backward failed")
    return json.loads(path.read_text())


def fb_child(folder: str, path: str, samples: str, seqlen: str, batch: str, device: str, dtype: str,
             threads: str) -> None:
    import torch
    import torch.nn.functional as F

    from bitplan.data import DEFAULT_CALIBRATION
    from bitplan.models import load_model
    from bitplan.profile.hooks import frozen_weights
    from bitplan.profile.inputs import calibration_windows
    from bitplan.profile.sketch import sample_labels

    if int(threads):
        torch.set_num_threads(int(threads))
    lm = load_model(folder, dtype=dtype, device=device)
    cal = calibration_windows(lm, DEFAULT_CALIBRATION, int(samples), int(seqlen), 0)
    windows = cal.windows.to(next(lm.model.parameters()).device)
    model, bs = lm.model, int(batch)
    hook = model.get_input_embeddings().register_forward_hook(
        lambda m, a, out: out.detach().requires_grad_(torch.is_grad_enabled()))
    sync = torch.cuda.synchronize if windows.is_cuda else (lambda: None)
    with frozen_weights(model):
        ids = windows[:1, :8]   # warm-up: first-call costs are not the pass's
        F.cross_entropy(model(input_ids=ids).logits.float().reshape(-1, model.config.vocab_size),
                        ids.reshape(-1)).backward()
        sync()
        t0 = time.perf_counter()
        for s in range(0, windows.shape[0], bs):
            ids = windows[s:s + bs]
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False).logits
                labels = sample_labels(logits, list(range(s, s + ids.shape[0])), 0)
                F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                reduction="sum").backward()
        sync()
        seconds = time.perf_counter() - t0
    hook.remove()
    Path(path).write_text(json.dumps({"seconds": seconds, "tokens": int(windows.numel()),
                                      "device": str(windows.device)}))


def forecasts(folder: Path, out: Path, args) -> tuple:
    """The dry-run's plans of the profile and the apply, as the commands would print them."""
    from bitplan.resources import Available, apply_job, profile_job

    free = Available(float("inf"), None)
    settings = json.loads((out / "prof" / "profile.json").read_text()).get("settings", {})
    prof, _ = profile_job(str(folder), samples=args.samples, seqlen=args.seqlen, batch_size=args.batch_size,
                          factor_groups=settings.get("factor_groups") or args.factor_groups,   # what the run chose
                          noise_samples=args.noise_samples,
                          judge_samples=args.judge_samples, sketch_chunk=1, checkpoint_every=64,
                          formats=args.formats, device=args.device, dtype=args.dtype, free=free)
    app = None
    if (out / "plan.json").is_file():
        app, _ = apply_job(out / "plan.json", model=str(folder), profile_dir=out / "prof", workers=args.workers,
                           device=args.device, dtype=args.dtype, free=free)
    return prof, app


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[4:])
    if len(sys.argv) > 1 and sys.argv[1] == "--fb-child":
        return fb_child(*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help=f"{', '.join(SHAPES)} or a config.json")
    ap.add_argument("--blocks", type=int, default=None, help="keep only the first N decoder blocks")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--noise-samples", type=int, default=1)
    ap.add_argument("--judge-samples", type=int, default=0)
    ap.add_argument("--factor-groups", type=int, default=None, help="default: the smallest that fits")
    ap.add_argument("--formats", default="default")
    ap.add_argument("--budget", default="4bpw")
    ap.add_argument("--workers", type=int, default=None, help="apply's layers at once (default: --threads, else one "
                    "per core)")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in every step (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.workers is None and args.threads:
        args.workers = args.threads   # apply's layers at once on as many cores as the other steps' threads
    folder = out / "model"
    build_model(load_config(args.config), args.blocks, folder, args.seed)
    fb = time_fb(folder, out, args.samples, args.seqlen, args.batch_size, args.device, args.dtype, args.threads)
    common = ["--device", args.device, "--dtype", args.dtype]
    threads = ["--threads", str(args.threads)] if args.threads else []
    groups = ["--factor-groups", str(args.factor_groups)] if args.factor_groups else []
    steps = {}
    steps["profile"] = run_step(out, "profile", [
        "profile", str(folder), "--samples", str(args.samples), "--seqlen", str(args.seqlen), "--out", str(out / "prof"),
        "--batch-size", str(args.batch_size), "--noise-samples", str(args.noise_samples), "--judge-samples",
        str(args.judge_samples), "--formats", args.formats, *groups, *threads, *common], args.threads)
    steps["solve"] = run_step(out, "solve", ["solve", str(out / "prof"), "--budget", args.budget, "-o",
                                             str(out / "plan.json")], args.threads)
    steps["apply"] = run_step(out, "apply", [
        "apply", str(out / "plan.json"), "--out", str(out / "q"), "--model", str(folder), "--profile",
        str(out / "prof"), "--overwrite", *(["--workers", str(args.workers)] if args.workers else []), *common],
        args.threads)
    steps["eval"] = run_step(out, "eval", [
        "eval", "--reference", str(folder), "--candidate", str(out / "q"), "--windows", str(args.eval_windows),
        "--seqlen", str(args.seqlen), "--json", str(out / "eval.json"), "--no-cache"], args.threads)
    report(out, args, fb, steps, *forecasts(folder, out, args))


def eval_forecast(folder: Path, seqlen: int) -> float:
    """What eval's offloading decision assumes it needs on the CPU (bitplan.offload.plan_placement): the process,
    the reference's float32 weights, and one window's working set (evaluate.working_bytes)."""
    import torch

    from bitplan.evaluate import working_bytes
    from bitplan.offload import PROCESS_BYTES, weight_bytes

    config = json.loads((folder / "config.json").read_text())
    return PROCESS_BYTES + weight_bytes(folder, torch.float32, config) + working_bytes(config, seqlen)


def report(out: Path, args, fb: dict, steps: dict, prof, app) -> None:
    from rich.console import Console
    from rich.table import Table

    from bitplan.resources import fmt_bytes

    profile = json.loads((out / "prof" / "profile.json").read_text())
    timing = profile.get("extra", {}).get("timing_s", {})
    unit = fb["seconds"]
    gpu = prof.device != "cpu"
    rows = []

    def row(name, seconds, host, device, forecast):
        rows.append({"phase": name, "wall_s": seconds, "times_fb": None if seconds is None else seconds / unit,
                     "host_bytes": host, "device_bytes": device,
                     "forecast": None if forecast is None else {"times_fb": forecast[0], "host_bytes": forecast[1],
                                                                "device_bytes": forecast[2]}})

    for phase in prof.phases:
        if phase.name != "load":
            row(f"profile: {phase.name}", timing.get(phase.name), None, None,
                (phase.times_fb, phase.host_bytes, phase.device_bytes))
    row("profile (whole process)", steps["profile"]["wall_s"], steps["profile"]["host_bytes"],
        steps["profile"].get("device_bytes"), (prof.times_fb, prof.host_bytes, prof.device_bytes))
    row("solve", steps["solve"]["wall_s"], steps["solve"]["host_bytes"], None, None)
    row("apply (whole process)", steps["apply"]["wall_s"], steps["apply"]["host_bytes"],
        steps["apply"].get("device_bytes"), None if app is None else (app.times_fb, app.host_bytes, app.device_bytes))
    row("eval", steps["eval"]["wall_s"], steps["eval"]["host_bytes"], steps["eval"].get("device_bytes"),
        None if gpu else (None, eval_forecast(out / "model", args.seqlen), None))

    table = Table(title=f"{args.config}{f', first {args.blocks} blocks' if args.blocks else ''} "
                        f"({prof.model.params / 1e9:.2f} B parameters), {args.samples} × {args.seqlen} tokens on "
                        f"{fb['device']}: one forward+backward {unit:.1f} s")
    for col in ("phase", "wall", "× fwd+bwd", "forecast", "peak host", "forecast", *(
            ("peak device", "forecast") if gpu else ())):
        table.add_column(col, justify="left" if col == "phase" else "right")

    def f(v, kind):
        if v is None:
            return "–"
        return f"{v:.0f} s" if kind == "s" else f"{v:.2f}" if kind == "x" else fmt_bytes(v)

    for r in rows:
        fc = r["forecast"] or {}
        cells = [r["phase"], f(r["wall_s"], "s"), f(r["times_fb"], "x"), f(fc.get("times_fb"), "x"),
                 f(r["host_bytes"], "b"), f(fc.get("host_bytes") if r["host_bytes"] else None, "b")]
        if gpu:
            cells += [f(r["device_bytes"], "b"), f(fc.get("device_bytes") if r["device_bytes"] else None, "b")]
        table.add_row(*cells)
    Console().print(table)
    kl = json.loads((out / "eval.json").read_text()) if (out / "eval.json").is_file() else {}
    (out / "results.json").write_text(json.dumps({
        "config": args.config, "blocks": args.blocks, "params": prof.model.params, "samples": args.samples,
        "seqlen": args.seqlen, "device": fb["device"], "forward_backward_s": unit, "rows": rows, "eval": kl}, indent=2))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
