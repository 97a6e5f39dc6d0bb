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

import gc
import math
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from .data import calibration_spans, describe_source, placed_token_windows, warn_if_same_source
from .devices import resolve_device, resolve_dtype
from .errors import BitplanError
from .io import check_writable, write_json
from .loading import open_header, open_model
from .logit_cache import LogitCache, default_cap
from .memory import release_freed_memory
from .offload import check_max_memory
from .models import LoadedModel, MemoryLimit, cache_dir, model_device, same_tokenizer, weights_sha256
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
    memory_notes: list[str] = field(default_factory=list)   # how a model that did not fit was run

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


def _context_length(config: dict) -> int | None:
    return config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")


def working_bytes(config: dict, seqlen: int) -> int:
    """A forecast of what one evaluation window takes beside the weights: the head's logits and their float32
    copy, the staged reference logits read back, the float64 log-softmax chunks of both models, and the
    activations (a few [seqlen, hidden] tensors per block in flight, and one head's attention scores)."""
    vocab = int(config.get("vocab_size") or 0)
    hidden = int(config.get("hidden_size") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    logits = 3 * seqlen * vocab * 4
    softmax = 8 * TOKEN_CHUNK * vocab * 8
    activations = 24 * seqlen * hidden * 4 + 2 * heads * seqlen * seqlen * 4
    return logits + softmax + activations


@torch.inference_mode()
def _logits(model, window: torch.Tensor) -> torch.Tensor:
    """Float32 logits [T, V] on the model's device."""
    return model(window[None].to(model_device(model))).logits[0].float()


@dataclass
class _Placing:
    """How both passes load their model, and what they report about it."""
    dtype: str | torch.dtype
    device: torch.device
    memory: MemoryLimit
    memory_notes: list[str] = field(default_factory=list)

    def open(self, spec: str | LoadedModel) -> LoadedModel:
        lm = open_model(spec, self.dtype, self.device, self.memory)
        if lm.memory_note:
            Console(stderr=True).print(f"[yellow]{escape(lm.memory_note)}[/]", soft_wrap=True)
            self.memory_notes.append(lm.memory_note)
        return lm

    def release(self) -> None:
        """Hand back the memory of a model no longer referenced, so the next one loaded finds it free."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        release_freed_memory()


def _reference_identity(reference: str | LoadedModel, dtype: torch.dtype) -> str | None:
    """The reference's identity for the logit cache, read from its safetensors shards without loading it (None
    where it must be loaded first: a checkpoint, or weights saved otherwise). A model loaded in another dtype
    than float32 has other logits, so its dtype joins the identity."""
    from .apply.source import open_lazy

    if isinstance(reference, LoadedModel):
        return None
    try:
        source, _ = open_lazy(str(reference))
    except BitplanError:   # a bitplan checkpoint as the reference
        return None
    if source is None:
        return None
    return _identity(source.weights_sha256, dtype)


def evaluate(reference: str | LoadedModel, candidate: str | LoadedModel, data: str, windows: int = 32,
             seqlen: int = 512, seed: int = 0, cache: bool = True, cache_gb: float | None = None,
             json_out: str | Path | None = None, progress: bool = True, exclude_calibration: bool = False,
             exclude: list[tuple[int, int]] | None = None, device: str | torch.device = "auto",
             dtype: str | torch.dtype = torch.float32, max_memory_gb: float | None = None) -> EvalResult:
    """Compare `candidate` with `reference` on `windows` held-out windows of `data` (see module docstring).
    `exclude` lists (start, length) spans of the data's token stream no window may touch; `exclude_calibration`
    adds the candidate's calibration windows when `data` is its calibration text. Both models run
    on `device` with their plain weights in `dtype` (bitplan.devices; "auto" is the checkpoint's dtype on a GPU,
    float32 on the CPU); the per-token statistics are float64 on that device. float32 is the default even on a GPU:
    each model's bf16 rounding adds a KL of its own, which more than doubled a small one (docs/design.md, "Devices
    and precision").

    The two models are never held at once: the reference's logits of every window are computed first and kept on
    disk (in the reference-logit cache, capped at `cache_gb` GiB, None: enough for this evaluation and at least 2;
    with `cache` off or a smaller cap, in a temporary folder deleted afterwards), the reference is released, then
    the candidate runs. A plain model whose weights do not fit the memory free on `device` (or `max_memory_gb`
    GiB, when given) is offloaded by accelerate (bitplan.offload); a checkpoint whose dequantized layers would not
    fit dequantizes them at every call instead of keeping them. Either is said when the model loads and recorded in
    the result's `memory_notes`."""
    if windows <= 0:
        raise BitplanError(f"--windows must be positive (got {windows})")
    if json_out is not None:  # a bad path costs a second, not the whole evaluation's figures
        check_writable(json_out, "file", "--json file")
    source = describe_source(data)  # a missing or empty file fails here, before any model is loaded
    device = resolve_device(device)
    if not isinstance(dtype, torch.dtype):
        resolve_dtype(dtype, device)  # a bad name fails before any model is loaded
    check_max_memory(max_memory_gb)   # before any model is loaded
    ref_head = open_header(reference)
    same_spec = isinstance(reference, str) and isinstance(candidate, str) and reference == candidate
    cand_head = ref_head if same_spec else open_header(candidate)
    if not same_tokenizer(ref_head.tokenizer, cand_head.tokenizer):
        raise BitplanError(f"{ref_head.spec} and {cand_head.spec} use different tokenizers; KL needs the same "
                           "vocabulary")
    context = min(c for c in (_context_length(ref_head.config), _context_length(cand_head.config), 10**9) if c)
    quant = cand_head.config.get("quantization_config")
    calibration = quant.get("calibration") if isinstance(quant, dict) else None
    spans = list(exclude or [])
    if exclude_calibration:
        if not calibration:
            raise BitplanError(f"{cand_head.spec} records no calibration, so there is nothing to exclude")
        spans += calibration_spans(ref_head.tokenizer, calibration, data)
    tokens = placed_token_windows(ref_head.tokenizer, data, windows, seqlen, seed, max_context=context,
                                  exclude=spans)[0]

    notes = []
    note = None if exclude_calibration else warn_if_same_source(calibration, source)
    if note:
        notes.append(note)

    need = default_cap(windows, seqlen, int(ref_head.config.get("vocab_size") or len(ref_head.tokenizer)))
    cap = need if cache_gb is None else int(cache_gb * 2**30)
    ref_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device, ref_head.config)
    with tempfile.TemporaryDirectory(prefix="eval-", dir=_scratch()) as scratch, Progress(progress) as bars:
        cached = LogitCache(cache_dir() / "logits", cap) if cache else None
        staged = cached if cached is not None and cap >= need else LogitCache(Path(scratch) / "logits", need)
        memory = MemoryLimit(Path(scratch) / "offload", working_bytes(ref_head.config, seqlen), max_memory_gb)
        placing = _Placing(dtype, device, memory)

        # 1. the reference's logits of every window, staged on disk; 2. the candidate against them
        ref_hash = _reference_identity(reference, ref_dtype) if cached is not None else ""
        keys, stats = _stage_reference(reference, tokens, cached, staged, ref_hash, same_spec,
                                       placing, bars.task(f"reference logits ({ref_head.model_id})", windows))
        placing.release()
        if not same_spec:
            stats = _score_candidate(candidate, tokens, keys, staged, placing,
                                     bars.task(f"eval {cand_head.model_id} vs {ref_head.model_id}", windows))
            placing.release()

    result = EvalResult(reference=ref_head.spec, candidate=cand_head.spec, data=data, windows=windows,
                        seqlen=seqlen, seed=seed, warnings=notes, excluded_spans=len(spans),
                        memory_notes=placing.memory_notes, **summarize(stats))
    if json_out is not None:
        write_json(json_out, result.to_json())
    return result


def _loaded_identity(model: torch.nn.Module) -> str:
    """A loaded reference's identity for the logit cache (its dtype joins it, as in `_reference_identity`). Weights
    offloaded to disk from files other than safetensors are not in memory to hash: a key of this run only, so
    its logits are staged but never found by another evaluation."""
    if any(p.is_meta for p in model.parameters()):
        return f"this-run-only-{uuid.uuid4().hex}"
    dtype = next(model.parameters()).dtype
    return _identity(weights_sha256(model), dtype)


def _identity(weights_hash: str, dtype: torch.dtype) -> str:
    """The logit cache's key for a reference: its weights (hashed dtype-free) and, other than float32, its dtype."""
    return weights_hash + (f"|{dtype}" if dtype != torch.float32 else "")


def _stage_reference(reference: str | LoadedModel, tokens: list[torch.Tensor], cached: LogitCache | None,
                     staged: LogitCache, ref_hash: str | None, same_spec: bool,
                     placing: _Placing, task) -> tuple[list[str], list[TokenStats]]:
    """Every window's reference logits into `staged`, from the cache where it holds them (the reference is loaded
    at the first window it does not hold; `ref_hash` "": no cache, None: known once loaded). Returns their keys,
    and the statistics of the reference against itself when it is also the candidate."""
    ref = None
    if ref_hash is None:   # the identity of a model that has to be loaded first
        ref = placing.open(reference)
        ref_hash = _loaded_identity(ref.model)
    keys = [staged.key(ref_hash, w) for w in tokens]
    stats = []
    for key, window in zip(keys, tokens):
        logits = cached.get(key) if cached is not None else None
        if logits is None:
            ref = ref or placing.open(reference)   # loaded at the first window the cache does not hold
            logits = _logits(ref.model, window).cpu()
            if cached is not None:
                cached.put(key, logits)
        if staged is not cached:
            staged.put(key, logits)
        if same_spec:   # the candidate is the reference: its logits are these
            stats.append(token_stats(logits[:-1], logits[:-1], window))
        task.advance()
    return keys, stats


def _score_candidate(candidate: str | LoadedModel, tokens: list[torch.Tensor], keys: list[str],
                     staged: LogitCache, placing: _Placing, task) -> list[TokenStats]:
    cand = placing.open(candidate)
    stats = []
    for key, window in zip(keys, tokens):
        ref_logits = staged.get(key)
        if ref_logits is None:
            raise BitplanError(f"the reference logits staged in {staged.root} were removed or damaged during the "
                               "evaluation; run it again")
        cand_logits = _logits(cand.model, window)
        stats.append(token_stats(ref_logits[:-1].to(cand_logits.device), cand_logits[:-1], window))
        del ref_logits, cand_logits
        task.advance()
    return stats


def _scratch() -> Path:
    """Where an evaluation stages reference logits and offloaded weights: beside the logit cache, on the disk
    that has room for it."""
    root = cache_dir() / "scratch"
    root.mkdir(parents=True, exist_ok=True)
    return root
