"""How faithful is a candidate model to its reference, on held-out text (`bitplan eval`).

Per scored token (each position predicting the next token of the window):
- KL(P_reference ‖ P_candidate) over the whole vocabulary,
- whether both models' most likely tokens agree,
- each model's negative log-likelihood of the actual next token (for perplexity),
- the change in the probability of the actual next token (Δp).

Windows are streamed one at a time and reduced to these per-token numbers at once, so memory does not grow
with the number of windows or the vocabulary beyond one window's logits. Statistics follow llama.cpp's
`--kl-divergence` report (mean ± standard error, percentiles, same-top-token rate, RMS Δp).

Evaluating on the calibration text itself is in-sample and only warned about; `exclude_calibration` instead draws
the windows from the parts of that text the candidate's calibration windows did not touch, which judges text of
the calibration's kind that the rounding did not fit.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .data import calibration_spans, describe_source, placed_token_windows, warn_if_same_source
from .errors import BitplanError
from .io import check_writable, write_json
from .logit_cache import LogitCache, default_cap
from .loading import open_model
from .devices import resolve_device, resolve_dtype
from .models import LoadedModel, cache_dir, model_device, same_tokenizer, weights_sha256
from .progress import Progress

TOKEN_CHUNK = 128  # positions per float64 softmax: bounds memory at 128 × vocab × 8 bytes per model


@dataclass
class TokenStats:
    """Per-token numbers for one window (numpy float64 / bool arrays of the scored positions)."""
    kl: np.ndarray
    agree: np.ndarray
    nll_reference: np.ndarray
    nll_candidate: np.ndarray
    dp: np.ndarray


@dataclass
class EvalResult:
    reference: str
    candidate: str
    data: str
    windows: int
    seqlen: int
    seed: int
    tokens: int
    kl_mean: float
    kl_se: float
    kl_median: float
    kl_p90: float
    kl_p99: float
    kl_p999: float
    kl_max: float
    top1_agreement: float
    top1_se: float
    ppl_reference: float
    ppl_candidate: float
    ppl_ratio: float
    rms_dp: float
    rms_dp_se: float
    warnings: list[str]
    excluded_spans: int = 0    # stretches of the text kept out of the windows (the calibration's, when excluded)

    def to_json(self) -> dict:
        return asdict(self)


def token_stats(ref_logits: torch.Tensor, cand_logits: torch.Tensor, window: torch.Tensor) -> TokenStats:
    """Per-token statistics of one window from both models' logits [T, V]; computed in float64."""
    if ref_logits.shape != cand_logits.shape:
        raise BitplanError(f"reference and candidate disagree on the vocabulary size "
                           f"({ref_logits.shape[-1]} vs {cand_logits.shape[-1]})")
    cand_logits = cand_logits.to(ref_logits.device)
    targets = window[1:].to(ref_logits.device)
    parts: list[list[np.ndarray]] = [[], [], [], [], []]
    n = targets.shape[0]
    for s in range(0, n, TOKEN_CHUNK):
        e = min(s + TOKEN_CHUNK, n)
        lp = torch.log_softmax(ref_logits[s:e].double(), dim=-1)
        lq = torch.log_softmax(cand_logits[s:e].double(), dim=-1)
        if not (torch.isfinite(lp).all() and torch.isfinite(lq).all()):
            raise BitplanError("a model produced NaN or infinite logits")
        t = targets[s:e, None]
        kl = (lp.exp() * (lp - lq)).sum(-1)
        agree = ref_logits[s:e].argmax(-1) == cand_logits[s:e].argmax(-1)
        nll_p, nll_q = -lp.gather(-1, t)[:, 0], -lq.gather(-1, t)[:, 0]
        dp = torch.exp(-nll_q) - torch.exp(-nll_p)
        for bucket, value in zip(parts, (kl, agree, nll_p, nll_q, dp)):
            bucket.append(value.cpu().numpy())
    return TokenStats(*(np.concatenate(p) for p in parts))


def summarize(stats: list[TokenStats]) -> dict:
    """Aggregate statistics over every scored token."""
    kl = np.concatenate([s.kl for s in stats])
    agree = np.concatenate([s.agree for s in stats]).astype(np.float64)
    nll_p = np.concatenate([s.nll_reference for s in stats])
    nll_q = np.concatenate([s.nll_candidate for s in stats])
    dp = np.concatenate([s.dp for s in stats])
    n = kl.size
    top1 = float(agree.mean())
    dp2 = dp * dp
    rms = math.sqrt(float(dp2.mean()))
    # Standard error of an RMS by the delta method: se(mean(x²)) / (2·rms).
    rms_se = float(dp2.std(ddof=1) / math.sqrt(n) / (2 * rms)) if rms > 0 and n > 1 else 0.0
    q = np.quantile(kl, [0.5, 0.9, 0.99, 0.999])
    return dict(
        tokens=n,
        kl_mean=float(kl.mean()), kl_se=float(kl.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        kl_median=float(q[0]), kl_p90=float(q[1]), kl_p99=float(q[2]), kl_p999=float(q[3]), kl_max=float(kl.max()),
        top1_agreement=top1, top1_se=math.sqrt(top1 * (1 - top1) / (n - 1)) if n > 1 else 0.0,
        ppl_reference=math.exp(nll_p.mean()), ppl_candidate=math.exp(nll_q.mean()),
        ppl_ratio=math.exp(nll_q.mean() - nll_p.mean()),
        rms_dp=rms, rms_dp_se=rms_se,
    )


def _context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


@torch.inference_mode()
def _logits(model, window: torch.Tensor) -> torch.Tensor:
    """Float32 logits [T, V] on the model's device."""
    return model(window[None].to(model_device(model))).logits[0].float()


def evaluate(reference: str | LoadedModel, candidate: str | LoadedModel, data: str, windows: int = 32,
             seqlen: int = 512, seed: int = 0, cache: bool = True, cache_gb: float | None = None,
             json_out: str | Path | None = None, progress: bool = True, exclude_calibration: bool = False,
             exclude: list[tuple[int, int]] | None = None, device: str | torch.device = "auto",
             dtype: str | torch.dtype = torch.float32) -> EvalResult:
    """Compare `candidate` with `reference` on `windows` held-out windows of `data` (see module docstring).
    `exclude` lists (start, length) spans of the data's token stream no window may touch; `exclude_calibration`
    adds the candidate's calibration windows when `data` is its calibration text. `cache_gb` caps the
    reference-logit cache in GiB; None: enough for this evaluation's reference logits, at least 2. Both models run
    on `device` with their plain weights in `dtype` (bitplan.devices; "auto" is the checkpoint's dtype on a GPU,
    float32 on the CPU); the per-token statistics are float64 on that device. float32 is the default even on a GPU:
    each model's bf16 rounding adds a KL of its own, which more than doubled a small one (docs/design.md, "Devices
    and precision")."""
    if windows <= 0:
        raise BitplanError(f"--windows must be positive (got {windows})")
    if json_out is not None:  # a bad path costs a second, not the whole evaluation's figures
        check_writable(json_out, "file", "--json file")
    source = describe_source(data)  # a missing or empty file fails here, before any model is loaded
    device = resolve_device(device)
    if not isinstance(dtype, torch.dtype):
        resolve_dtype(dtype, device)  # a bad name fails before any model is loaded
    ref = open_model(reference, dtype, device)
    same_spec = isinstance(reference, str) and isinstance(candidate, str) and reference == candidate
    cand = ref if same_spec else open_model(candidate, dtype, device)
    if not same_tokenizer(ref.tokenizer, cand.tokenizer):
        raise BitplanError(f"{ref.spec} and {cand.spec} use different tokenizers; KL needs the same vocabulary")
    context = min(c for c in (_context_length(ref.model), _context_length(cand.model), 10**9) if c)
    quant = getattr(cand.model.config, "quantization_config", None)
    calibration = quant.get("calibration") if isinstance(quant, dict) else None
    spans = list(exclude or [])
    if exclude_calibration:
        if not calibration:
            raise BitplanError(f"{cand.spec} records no calibration, so there is nothing to exclude")
        spans += calibration_spans(ref.tokenizer, calibration, data)
    tokens = placed_token_windows(ref.tokenizer, data, windows, seqlen, seed, max_context=context,
                                  exclude=spans)[0]

    notes = []
    note = None if exclude_calibration else warn_if_same_source(calibration, source)
    if note:
        notes.append(note)

    if cache_gb is None:
        head = ref.model.get_output_embeddings()
        vocab = getattr(head, "out_features", None) or getattr(ref.model.config, "vocab_size", None) or 0
        cap = default_cap(windows, seqlen, vocab)
    else:
        cap = int(cache_gb * 2**30)
    logit_cache = LogitCache(cache_dir() / "logits", cap) if cache else None
    ref_hash = weights_sha256(ref.model) if logit_cache else ""
    ref_dtype = next(ref.model.parameters()).dtype
    if logit_cache and ref_dtype != torch.float32:
        # the hash is the weights' (dtype-free: bf16 hashes as its float32 upcast); logits in another dtype differ
        ref_hash += f"|{ref_dtype}"
    stats: list[TokenStats] = []
    with Progress(progress) as bars:
        task = bars.task(f"eval {cand.model_id} vs {ref.model_id}", windows)
        for window in tokens:
            key = logit_cache.key(ref_hash, window) if logit_cache else None
            ref_logits = logit_cache.get(key) if logit_cache else None
            if ref_logits is None:
                ref_logits = _logits(ref.model, window)
                if logit_cache:
                    logit_cache.put(key, ref_logits.cpu())
            cand_logits = ref_logits if cand is ref else _logits(cand.model, window)
            stats.append(token_stats(ref_logits[:-1].to(cand_logits.device), cand_logits[:-1], window))
            task.advance()

    result = EvalResult(reference=ref.spec, candidate=cand.spec, data=data, windows=windows, seqlen=seqlen,
                        seed=seed, warnings=notes, excluded_spans=len(spans), **summarize(stats))
    if json_out is not None:
        write_json(json_out, result.to_json())
    return result
