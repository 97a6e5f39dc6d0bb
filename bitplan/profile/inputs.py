"""What `profile_model` is given, checked and resolved: the model, the calibration windows and their halves, the
candidate formats, the judge's size. Everything here fails with a BitplanError before any work starts."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from ..devices import resolve_device, resolve_dtype
from ..errors import BitplanError
from ..formats import Format, default_candidates, get_format, ggml_candidates, vllm_candidates
from ..models import LoadedModel, load_model, model_device
from .defaults import DEFAULT_HALVES, DEFAULT_JUDGE_SAMPLES, DEFAULT_SAMPLES, DEFAULT_SEQLEN, HALF_SPLITS
from .judge import find_start_token
from .seeds import generator


@dataclass
class Calibration:
    windows: torch.Tensor          # [samples, seqlen] token ids
    description: dict
    positions: torch.Tensor        # [samples] where each window starts in the source (row order for token ids)


def resolve_model(model: str | Path | LoadedModel | nn.Module, device: str | torch.device = "auto",
                  dtype: str | torch.dtype = "auto") -> LoadedModel:
    """A model named by a path or name is loaded in `dtype` on `device`; a model passed in memory is profiled where
    it is, in its own dtype (a `device` or `dtype` other than "auto" must then agree with it)."""
    if not isinstance(model, (LoadedModel, nn.Module)):
        return load_model(str(model), dtype, device)
    loaded = model if isinstance(model, LoadedModel) else LoadedModel(
        model=model, tokenizer=None, spec=type(model).__name__, model_id=type(model).__name__, path=Path("."))
    loaded.model.eval()
    have_device, have_dtype = model_device(loaded.model), next(loaded.model.parameters()).dtype
    want_device = resolve_device(device)
    want_dtype = resolve_dtype(dtype, want_device)
    if str(device or "auto").lower() != "auto" and (want_device.type, want_device.index or 0) != (
            have_device.type, have_device.index or 0):
        raise BitplanError(f"the model passed to profile_model is on {have_device}, not {want_device}; move it "
                           f"there first (model.to(...)) or pass device='auto'")
    if not (isinstance(dtype, str) and dtype.lower() == "auto") and dtype is not None and want_dtype != have_dtype:
        raise BitplanError(f"the model passed to profile_model holds {have_dtype} weights, not {want_dtype}; "
                           "cast it first or pass dtype='auto'")
    return loaded


def check_finite(net: nn.Module, infos) -> None:
    """Refuse a model whose block linears hold NaN or infinite weights: every Hessian and coefficient of it would
    be NaN, and the phases fail deep inside with a traceback."""
    for info in infos:
        W = net.get_submodule(info.name).weight
        if not bool(torch.isfinite(W).all()):
            bad = int((~torch.isfinite(W)).sum())
            raise BitplanError(f"the model's weight {info.name} holds {bad} NaN or infinite value(s): the model file "
                               "is damaged or was saved from a diverged run; profile a model with finite weights")


def calibration_windows(loaded: LoadedModel, calib: str | Path | torch.Tensor, samples: int | None,
                        seqlen: int | None, seed: int) -> Calibration:
    """The calibration windows from token ids [windows, seqlen] or text (a path or hf:NAME), with their
    description for profile.json."""
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


def candidate_formats(formats: str | list | None) -> list[Format]:
    """The formats to measure: None or "default" for the default candidates, else names and the named menus
    `default`, `ggml` (ggml's block types and fp16) and `vllm` (the formats vLLM runs), as a list or one string
    separated by commas or spaces; a format named twice is measured once."""
    if formats is None:
        return list(default_candidates())
    if isinstance(formats, str):
        formats = [f for f in re.split(r"[,\s]+", formats) if f]
    out: list[Format] = []
    for f in formats:
        key = f.lower() if isinstance(f, str) else None
        menus = {"default": default_candidates, "ggml": ggml_candidates, "vllm": vllm_candidates}
        out += list(menus[key]()) if key in menus else [get_format(f)]
    if not out:
        raise BitplanError("--formats names no format")
    return list({f.name: f for f in out}.values())


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


def check_options(windows: torch.Tensor, sketch_chunk: int, noise_samples: int, batch_size: int,
                  checkpoint_every: int) -> None:
    n_windows, T = windows.shape
    if not 1 <= sketch_chunk <= T:
        raise BitplanError(f"--sketch-chunk must be between 1 and the window length {T}, got {sketch_chunk}")
    if not 0 <= noise_samples <= n_windows:
        raise BitplanError(f"--noise-samples must be between 0 and --samples ({n_windows}), got {noise_samples}")
    if batch_size < 1 or checkpoint_every < 1:
        raise BitplanError("batch size and checkpoint interval must be positive")


def judge_size(judge_samples: int | None, loaded: LoadedModel, say: bool) -> int:
    """The judge's window count: None is DEFAULT_JUDGE_SAMPLES for a model that names a BOS or EOS token to start
    the samples from, and no judge (with a note when `say`) for one that names neither."""
    if judge_samples is None:
        judge_samples = DEFAULT_JUDGE_SAMPLES if find_start_token(loaded.model, loaded.tokenizer) is not None else 0
        if not judge_samples and say:
            Console(stderr=True).print("[yellow]no judge from the model's own samples: the model names no BOS or "
                                       "EOS token to start them from (the forecast is the calibration halves' "
                                       "alone)[/]")
    if judge_samples < 0:
        raise BitplanError(f"--judge-samples must be 0 (no judge) or a number of windows, got {judge_samples}")
    return judge_samples
