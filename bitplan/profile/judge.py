"""A judge from the model's own samples: the forecast for text unlike the calibration.

The cross-fitted forecast (heldout.py) fits one calibration half and judges it under the other: text of the
calibration's kind, where it holds within 4 %. On other text adaptive rounding gains less than that (its gain is
partly specific to the text it was fitted on), and the forecast missed WikiText by up to 17 % at 64K calibration
tokens. The model's own samples belong to no corpus and are the text its KL is an expectation over when no other
text is at hand: judged under their factors, every ratio came within 9 % of WikiText's measured one (README,
"A judge from the model's own samples").

The judge's windows start at the model's BOS token and continue with tokens drawn from the model itself
(temperature 1, the full distribution), each window with its own seeded generator. Their factors are
accumulated exactly like a calibration half's (labels sampled from the model's outputs) into hessians/judge/.
Each layer is then fitted as `apply` fits it (both calibration halves summed: Σxxᵀ for one-sided LDLQ, the raw
factors, the factors shrunk by the profile's chosen λs) and the fit is judged under the judge's factors; the
judge's own per-token Fisher scale (α_shaped on the samples) weighs the layers.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import BitplanError
from ..heldout import DEFAULT_SHRINK_TARGET, Judge, rotate_factor, rotated_target, side_gain
from ..linalg import LDL, LDLSettings
from ..models import model_device
from .factors import FactorSums
from .hessians import LayerFactors
from .relerr import rotation_seeds
from .seeds import generator

JUDGE = "judge"                 # the hessians/ subfolder and the factor set's name
JUDGE_WINDOW_OFFSET = 1 << 40   # judge windows' ids for the label seeds: never a calibration window's
# Windows sampled together: every step streams the whole model, so wide steps pay (the default model, 64 windows of
# 12 tokens: batches of 64 took 0.48 × the time of batches of 16). Fixed, so the samples do not depend on options.
SAMPLE_BATCH = 64


def find_start_token(model: nn.Module, tokenizer=None) -> int | None:
    """The token every sampled window starts from: BOS, else EOS (a document boundary); None if neither the
    tokenizer nor the model's config names one."""
    for source in (tokenizer, getattr(model, "config", None)):
        for attr in ("bos_token_id", "eos_token_id"):
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return None


def start_token(model: nn.Module, tokenizer=None) -> int:
    """`find_start_token`, or a BitplanError saying how to go without the judge."""
    token = find_start_token(model, tokenizer)
    if token is None:
        raise BitplanError("the judge samples from the model's BOS token, and neither the tokenizer nor the model "
                           "config names one; run with --judge-samples 0")
    return token


def sample_windows(model: nn.Module, n: int, seqlen: int, start: int, seed: int,
                   advance: Callable[[int], None] | None = None) -> torch.Tensor:
    """[n, seqlen] token ids: `start`, then seqlen − 1 tokens drawn from the model at temperature 1 with a KV
    cache. Window w draws with generator (seed, "judge", w), so a window does not depend on how many others
    are drawn. `advance(k)` is called after every batch of k windows."""
    # transformers 5.x names the KV cache `cache` (argument and output); earlier versions `past_key_values`
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    device = model_device(model)
    out = torch.empty(n, seqlen, dtype=torch.long)
    for s in range(0, n, SAMPLE_BATCH):
        ids = list(range(s, min(n, s + SAMPLE_BATCH)))
        gens = [generator(seed, "judge", w) for w in ids]
        tokens = torch.full((len(ids), 1), start, dtype=torch.long)
        out[ids, 0] = start
        past = None
        with torch.inference_mode():
            for t in range(1, seqlen):
                res = model(input_ids=tokens.to(device), use_cache=True, **{cache_arg: past})
                past = res[cache_arg]
                # drawn on the host with the host's generators: the same windows from every device (one
                # vocabulary-wide row per window and step crosses)
                probs = torch.softmax(res.logits[:, -1].float(), dim=-1).cpu()
                tokens = torch.stack([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)])
                out[ids, t] = tokens[:, 0]
        if advance is not None:
            advance(len(ids))
    return out


@dataclass
class JudgedGains:
    """One layer's fits, judged under the samples' factors (expected proxy ÷ round-to-nearest's)."""
    ldlq: float | None        # one-sided LDLQ, H_I = Σxxᵀ of both halves (None without Σxxᵀ)
    yaqa_raw: float           # two-sided, both halves' raw factors
    yaqa: float               # two-sided, both halves' factors shrunk by the profile's λs (`apply --shrink auto`)
    alpha_shaped: float       # the layer's α at the samples' own per-token scale: what the gains multiply


def judged_gains(fit: LayerFactors, judge: FactorSums, weight_sq_norm: float, shrink_out: float, shrink_in: float,
                 *, ldl: LDLSettings = LDL, target: str = DEFAULT_SHRINK_TARGET) -> JudgedGains:
    """Fit layer `fit` as apply does (both halves), judge it under `judge`'s factors, in the rotated basis."""
    if judge.samples == 0 or judge.tokens == 0:
        raise BitplanError(f"{fit.name}: the judge's factors were accumulated from no samples")
    m, n = fit.h_out_a.shape[0], fit.h_in_a.shape[0]
    so, si = rotation_seeds(fit.name)
    h_out, h_in = fit.h_out, fit.h_in   # both halves summed (each access adds them)
    f_out, f_in = rotate_factor(h_out, so), rotate_factor(h_in, si)
    t_out, t_in = rotated_target(h_out, so, target), rotated_target(h_in, si, target)
    j_out, j_in = Judge.of(rotate_factor(judge.h_out, so)), Judge.of(rotate_factor(judge.h_in, si))

    def two_sided(lam_out: float, lam_in: float) -> float:
        return (side_gain(f_out, j_out, ldl, lam_out, f"{fit.name} (H_out)", t_out)
                * side_gain(f_in, j_in, ldl, lam_in, f"{fit.name} (H_in)", t_in))

    xtx = fit.xtx
    ldlq = None if xtx is None else side_gain(rotate_factor(xtx, si), j_in, ldl, 0.0, f"{fit.name} (xxᵀ)")
    # α_shaped = ½ (‖W‖²/mn) · Σ_c‖G_c‖²/tokens (coefficients.py), on the samples' statistics
    alpha = 0.5 * weight_sq_norm / (m * n) * judge.grad_sq / judge.tokens
    return JudgedGains(ldlq=ldlq, yaqa_raw=two_sided(0.0, 0.0), yaqa=two_sided(shrink_out, shrink_in),
                       alpha_shaped=alpha)
