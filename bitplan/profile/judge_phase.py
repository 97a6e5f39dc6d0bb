"""The judge phase: an addition to a finished profile (judge.py has the math). It samples the judge's windows
from the model, accumulates their factors into hessians/judge/, judges every layer's fit under them and rewrites
profile.json and sensitivity.csv. The judge is not part of the profile's fingerprint: asking a finished profile
for one computes only the judge.

Every file is replaced atomically, so a killed run leaves the profile as it was. The judge's folder is complete
when its settings.json is written: then it is reused (the samples and their factors depend only on the model and
the judge's settings), and only the judging is redone."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..heldout import DEFAULT_SHRINK_TARGET
from ..io import atomic_path, read_json, write_json
from ..linalg import LDL
from ..models import LinearInfo, LoadedModel, get_module, model_device
from ..progress import Progress
from .factors import FactorSums
from .hessians import HESSIAN_DIR, factors_path, load_factors, read_half_factors, save_half_factors
from .judge import JUDGE, JUDGE_WINDOW_OFFSET, JudgedGains, judged_gains, sample_windows, start_token
from .output import write_profile
from .phases import Events, layer_groups
from .schema import LayerRecord, Profile
from .sketch import accumulate_batch


def judge_phase(profile: Profile, out: Path, loaded: LoadedModel, infos: list[LinearInfo], judge: dict,
                batch_size: int, progress: Progress, emit: Events, factor_groups: int = 1) -> Profile:
    """`judge`: samples, seqlen, seed, sketch_chunk (what profile.json records as the judge's settings).
    `factor_groups` as for the profile's factors: the judge's windows pass once per group of layers."""
    folder = out / HESSIAN_DIR / JUDGE
    settings = {**judge, "weights_sha256": profile.model["weights_sha256"]}
    marker = folder / "settings.json"
    t0 = time.perf_counter()
    if not (marker.is_file() and read_json(marker, "judge settings") == settings):
        marker.unlink(missing_ok=True)
        judge_factors(out, loaded, infos, judge, batch_size, progress, emit, factor_groups)
        write_json(marker, settings)
    task = progress.task("judge: judging each layer's fit", len(infos))
    for k, rec in enumerate(profile.layers):
        g = judge_layer(out, rec, model_device(loaded.model))
        rec.extra.update(alpha_shaped_judge=g.alpha_shaped, yaqa_gain_judged=g.yaqa,
                         yaqa_gain_judged_raw=g.yaqa_raw, ldlq_gain_judged=g.ldlq)
        task.advance()
        emit("judge", k + 1)
    profile.extra["judge"] = {"settings": judge, "tokens": judge["samples"] * judge["seqlen"],
                              "source": "the model's own samples: temperature 1 from its BOS token"}
    profile.extra.setdefault("timing_s", {})["judge"] = round(time.perf_counter() - t0, 2)
    return write_profile(profile, out)


def judge_layer(out: Path, rec: LayerRecord, device: torch.device | str = "cpu") -> JudgedGains:
    """Layer `rec`'s fit as `apply --shrink auto` makes it (both halves, its λs and shrinkage target), judged under
    the judge's factors in OUT/hessians/judge/, in float64 on `device`."""
    sums, _ = read_half_factors(factors_path(out, rec.name, JUDGE), device=device)
    return judged_gains(load_factors(out, rec.name, device=device), sums, rec.weight_sq_norm, rec.extra.get("shrink_out") or 0.0,
                        rec.extra.get("shrink_in") or 0.0, ldl=LDL,
                        target=rec.extra.get("shrink_target") or DEFAULT_SHRINK_TARGET)


def judge_factors(out: Path, loaded: LoadedModel, infos: list[LinearInfo], judge: dict, batch_size: int,
                  progress: Progress, emit: Events, factor_groups: int = 1) -> None:
    """The judge's windows (and their text, for people to read) and every layer's factors on them: sampled once,
    then one pass over them per group of layers (`layer_groups`), which holds only that group's float64 sums.
    A layer's sums do not depend on which others are hooked beside it, so any grouping writes the same files."""
    net, folder = loaded.model, out / HESSIAN_DIR / JUDGE
    n, T, seed, chunk = judge["samples"], judge["seqlen"], judge["seed"], judge["sketch_chunk"]
    start = start_token(net, loaded.tokenizer)
    task = progress.task("judge: sampling from the model", n)
    windows = sample_windows(net, n, T, start, seed, task.advance)
    if loaded.tokenizer is not None:
        with atomic_path(folder / "samples.jsonl") as tmp:
            Path(tmp).write_text("".join(json.dumps({"id": f"judge-{w}", "text": loaded.tokenizer.decode(ids[1:])})
                                         + "\n" for w, ids in enumerate(windows.tolist())))
    device = model_device(net)
    groups = layer_groups(infos, factor_groups)
    for g, group in enumerate(groups):
        modules = {i.name: get_module(net, i.name) for i in group}
        # judging reads the factors and Σ‖G_c‖² only: no Σxxᵀ, no window sums
        sums = {i.name: FactorSums.zeros(i.out_features, i.in_features, moments=False, device=device) for i in group}
        task = progress.task("judge: factors" + (f", layers {g + 1}/{len(groups)}" if len(groups) > 1 else ""), n)
        for s in range(0, n, batch_size):
            idx = list(range(s, min(n, s + batch_size)))
            accumulate_batch(net, modules, windows[idx], [JUDGE_WINDOW_OFFSET + w for w in idx], seed, chunk, sums,
                             moments=False)
            task.advance(len(idx))
            emit("judge-factors", g * n + idx[-1] + 1)
        for info in group:
            save_half_factors(factors_path(out, info.name, JUDGE), info.name, JUDGE, sums.pop(info.name), chunk)
