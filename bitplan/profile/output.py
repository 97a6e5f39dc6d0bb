"""The profile's two result files: the `Profile` assembled from the phases' per-layer results, and
`write_profile`, the one function that writes profile.json and sensitivity.csv (a fresh profile, one asked for
other formats, one that gains its judge)."""
from __future__ import annotations

from pathlib import Path

import torch

from .. import __version__
from ..distributed import Ranks
from ..formats import Format
from ..linalg import LDL
from ..models import LinearInfo, LoadedModel, find_extras
from .inputs import Calibration
from .schema import LayerRecord, Profile


def write_profile(profile: Profile, out: Path) -> Profile:
    """OUT/profile.json and OUT/sensitivity.csv, each replaced atomically."""
    from .report import write_csv  # pandas: only once there is a profile to write

    profile.save(out / "profile.json")
    write_csv(profile, out / "sensitivity.csv")
    return profile


def format_table(fmts: list[Format]) -> dict[str, dict]:
    return {f.name: {"mse_q": f.mse_q, "nominal_bits": f.nominal_bits} for f in fmts}


def versions() -> dict[str, str]:
    import transformers

    return {"bitplan": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def layer_record(info: LinearInfo, res: dict, fit: dict | None, rel_err: dict[str, float]) -> LayerRecord:
    """One layer's record from its coefficient (`res`), noise (`fit`, None without) and format results."""
    return LayerRecord(
        name=info.name, block=info.block, kind=info.kind, shape=(info.out_features, info.in_features),
        weight_sq_norm=res["weight_sq_norm"], trace_h_in=res["trace_h_in"], trace_h_out=res["trace_h_out"],
        alpha_noise=fit["alpha"] if fit else None, alpha_noise_r2=fit["r2"] if fit else None,
        alpha_hessian=res["alpha_hessian"], alpha_yaqa=res["alpha_yaqa"],
        alpha_yaqa_heldout=res["alpha_yaqa_heldout"], rel_err=rel_err,
        extra={"n_samples": res["samples"], "tokens": res["tokens"],
               "grad_sq_per_sample": res["grad_sq_per_sample"], "grad_sq_per_token": res["grad_sq_per_token"],
               "kron_scale_c": res["c"], "alpha_shaped": res["alpha_shaped"], "yaqa_gain": res["yaqa_gain"],
               "yaqa_gain_heldout": res["yaqa_gain_heldout"],
               "yaqa_gain_heldout_raw": res["yaqa_gain_heldout_raw"], "ldlq_gain_heldout": res["ldlq_gain_heldout"],
               **{k: res.get(k) for k in ("shrink_out", "shrink_in", "shrink_target", "shrink_gains",
                                          "shrink_in_gains")},
               "ldl_sigma_in": res["sigma_in"], "ldl_sigma_out": res["sigma_out"],
               **({"noise_t2": fit["t2"], "noise_dkl": fit["dkl"]} if fit else {})})


def outer_record(info: LinearInfo, res: dict, fit: dict | None, rel_err: dict[str, float],
                 fmts: list[Format]) -> LayerRecord:
    """The embedding's or an untied head's record from its gradient pass (`res`, outer.py), noise and formats.
    No Kronecker factors are kept for it (at most the head input's Σxxᵀ, for one-sided LDLQ), so it has no
    adaptive-rounding figures."""
    rec = LayerRecord(
        name=info.name, block=info.block, kind=info.kind, shape=info.shape, weight_sq_norm=res["weight_sq_norm"],
        trace_h_in=res["trace_h_in"], trace_h_out=res["trace_h_out"],
        alpha_noise=fit["alpha"] if fit else None, alpha_noise_r2=fit["r2"] if fit else None,
        alpha_hessian=res["alpha_hessian"], rel_err=rel_err, ties=list(info.ties),
        extra={"tokens": res["tokens"], "grad_sq_per_token": res["grad_sq_per_token"],
               **({"rows_seen": res["rows_seen"]} if "rows_seen" in res else {}),
               **({"noise_t2": fit["t2"], "noise_dkl": fit["dkl"]} if fit else {})})
    set_inapplicable(rec, fmts)
    return rec


def applicable(fmt: Format, shape: tuple[int, int]) -> bool:
    """Whether `fmt` can store a matrix of `shape` (a super-block format needs the input width a multiple of its
    block, e.g. 256 for the K-types)."""
    return bool(fmt.applicable(*shape))


def set_inapplicable(rec: LayerRecord, fmts: list[Format]) -> None:
    """Note in the record the candidates its shape rules out (no rel_err: the solver never offers them)."""
    ruled_out = [f.name for f in fmts if not applicable(f, rec.shape)]
    if ruled_out:
        rec.extra["inapplicable_formats"] = ruled_out
    else:
        rec.extra.pop("inapplicable_formats", None)


def assemble_profile(loaded: LoadedModel, infos: list[LinearInfo], fmts: list[Format], cal: Calibration,
                     split: tuple[list[int], list[int]], fingerprint: dict, options: dict, results: dict[str, dict],
                     noise: dict[str, dict], rel_errs: dict[str, dict], timing: dict[str, float],
                     ranks: Ranks, peak_rss_gb: float, outer: list[LinearInfo] = (),
                     outer_results: dict[str, dict] | None = None, compute: dict | None = None) -> Profile:
    """The profile of a finished job: `fingerprint` holds the settings that change results, `options` those that
    do not (batch size, checkpoint interval, factor groups). `outer` (the embedding and an untied head) with
    `outer_results` (their gradient pass) become the profile's outer_layers. `compute` (device, dtype: where the
    phases ran and the weights' dtype there) goes to the settings, for readers: it is no part of the fingerprint."""
    net = loaded.model
    halves, noise_samples = fingerprint["halves"], fingerprint["noise_samples"]
    records = [layer_record(i, results[i.name], noise.get(i.name), rel_errs[i.name]) for i in infos]
    for rec in records:
        set_inapplicable(rec, fmts)
    outer_records = [outer_record(i, outer_results[i.name], noise.get(i.name), rel_errs[i.name], fmts)
                     for i in outer]
    params = {id(p): p.numel() for p in net.parameters()}
    calibration = dict(cal.description, halves={"split": halves, "a": len(split[0]), "b": len(split[1])},
                       noise_samples=noise_samples, noise_tokens=noise_samples * fingerprint["seqlen"])
    return Profile(
        model={"id": loaded.model_id, "spec": loaded.spec, "weights_sha256": fingerprint["weights_sha256"],
               "architecture": type(net).__name__, "n_params": sum(params.values()),
               "block_linear_params": sum(i.params for i in infos), "dtype": str(next(net.parameters()).dtype)},
        calibration=calibration,
        formats=[f.name for f in fmts], layers=records, extras=find_extras(net),
        settings={"sketch_chunk": fingerprint["sketch_chunk"], "labels": "sampled from the model's output distribution",
                  "halves": (f"{halves} split of the calibration windows"
                             + (" (by where they start in the source)" if halves == "contiguous" else " (seeded)")
                             + "; factors kept per half"),
                  "noise_levels": fingerprint["noise_levels"], "noise_samples": noise_samples, "ldl_block": LDL.block,
                  "ldl_sigma": LDL.sigma, "dkl_unit": "mean per-token KL(original ‖ quantized), nats",
                  "fingerprint": fingerprint, **options, **(compute or {})},
        extra={"versions": versions(), "timing_s": {k: round(v, 2) for k, v in timing.items()},
               "peak_rss_gb": round(peak_rss_gb, 3),
               "torch_threads": torch.get_num_threads(), "processes": ranks.world,
               "format_table": format_table(fmts)},
        outer_layers=outer_records)
