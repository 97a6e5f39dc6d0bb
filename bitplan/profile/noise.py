"""Linearity-theorem coefficients measured by noise injection, one layer at a time.

W ← W + s·Z with a fixed Gaussian draw Z per layer (seeded by the layer name) scaled to relative sizes t², and
α_noise is the least-squares line through the origin of ΔKL(t²), where ΔKL is the mean per-token
KL(original ‖ noisy) on the noise windows. The original model's inputs to every decoder block and its
log-probabilities are cached once, so a layer's measurement reruns only its own block and those after it.
The output head's reruns only the head (on the cached final hidden states). The token embedding changes the
input to block 0, so its measurement reruns the whole model from the token ids, against the unperturbed model's
own full forward; a head tied to it is perturbed with it (one tensor, both roles: the cost of rounding it once).

A bf16 or fp16 model's reruns compute in float32, one decoder block (and then the final norm and head) at a time
(`widened`): in its own dtype every rerun downstream of the perturbed layer rounds differently from the
reference, a KL floor under the ΔKL. On the tiny test model (the layers whose α_noise is ≥ 1 % of the largest),
α_noise in bf16 came within 1.4 % at the median (5.1 % at most) of the float32 profile of the same weights
without it, and within 0.34 % (2.2 %) with it. The cached block inputs stay the model's own.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import BitplanError
from ..models import decoder_layers, decoder_prefix, get_module, model_device
from .seeds import generator

# Two levels, where the fit has a third point in the origin. A least-squares line through the origin weighs each
# level by t⁴, so a third at t² = 0.005 moved no layer's α_noise by more than 0.13 % on the default profile
# (Spearman 0.99999 against the three-level α) while costing a third of the phase (README, "Choosing the
# profile's defaults").
DEFAULT_LEVELS = (0.02, 0.06)


@dataclass
class NoiseBatch:
    block_inputs: list[torch.Tensor]          # hidden states entering each decoder block
    block_kwargs: list[dict[str, Any]]        # the other arguments each block was called with
    ref_logprobs: torch.Tensor                # [B, T, V] float32 (float64 for float64 models), the original model
    ids: torch.Tensor | None = None           # the token ids (the embedding's measurement reruns the whole model)
    final_hidden: torch.Tensor | None = None  # the last block's output (the head's measurement reruns the head)
    full_logprobs: torch.Tensor | None = None  # the whole model's own forward, the embedding's reference


@dataclass
class NoiseCache:
    batches: list[NoiseBatch] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(b.ref_logprobs.shape[0] * b.ref_logprobs.shape[1] for b in self.batches)


@dataclass
class NoiseFit:
    t2: list[float]          # realized relative error ‖sZ‖²/‖W‖² at each level
    dkl: list[float]         # mean per-token KL(original ‖ noisy)
    alpha: float             # ΔKL per unit t²
    r2: float | None         # centered R² of the line through the origin (None with fewer than 2 levels)


def fit_through_origin(x: list[float], y: list[float]) -> tuple[float, float | None]:
    """Least squares y ≈ αx with no intercept; R² = 1 − SS_res/SS_tot (centered: a flat response scores 0,
    so R² near 1 means ΔKL really grows in proportion to t²)."""
    xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    alpha = float((xt * yt).sum() / (xt * xt).sum())
    if len(x) < 2:
        return alpha, None
    ss_res = float(((yt - alpha * xt) ** 2).sum())
    ss_tot = float(((yt - yt.mean()) ** 2).sum())
    if ss_tot == 0.0:
        return alpha, 1.0 if ss_res == 0.0 else None
    return alpha, 1.0 - ss_res / ss_tot


class _Tail:
    """The final norm and the output head: what the model does after its last decoder block."""

    def __init__(self, model: nn.Module):
        prefix = decoder_prefix(model)
        base = get_module(model, prefix.rsplit(".", 1)[0]) if "." in prefix else model
        names = ("norm", "final_layernorm", "final_layer_norm", "ln_f")  # Llama and most, Phi, GPT-NeoX, GPT-2
        norm = next((getattr(base, a) for a in names if hasattr(base, a)), None)
        head = model.get_output_embeddings()
        if norm is None or head is None:
            raise BitplanError(f"noise injection does not know the output path of {type(model).__name__} "
                               "(no final norm or head found); run with --noise-samples 0")
        self.norm, self.head = norm, head
        # Gemma 2 soft-caps its logits after the head: cap · tanh(logits / cap).
        self.softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.norm(h))
        return logits if not self.softcap else torch.tanh(logits / self.softcap) * self.softcap


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def build_cache(model: nn.Module, windows: torch.Tensor, batch_size: int) -> NoiseCache:
    """Run the original model once over `windows`, keeping each block's inputs and the final log-probs.
    Checks that replaying the blocks from the cache reproduces the logits (else the architecture is unsupported)."""
    layers = decoder_layers(model)
    tail = _Tail(model)
    cache = NoiseCache()
    device = model_device(model)
    for s in range(0, windows.shape[0], batch_size):
        ids = windows[s:s + batch_size].to(device)
        inputs: list[torch.Tensor | None] = [None] * len(layers)
        kwargs: list[dict[str, Any] | None] = [None] * len(layers)

        def make_hook(i: int):
            def hook(module, args, kw):
                kw = dict(kw)
                inputs[i] = args[0] if args else kw.pop("hidden_states")
                kwargs[i] = kw
                if args[1:]:
                    raise BitplanError(f"decoder block {i} takes positional arguments bitplan cannot replay; "
                                       "run with --noise-samples 0")
            return hook

        handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            with torch.inference_mode():
                logits = model(input_ids=ids, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        if any(x is None for x in inputs):
            raise BitplanError("not every decoder block ran in the model's forward; noise injection cannot replay it")
        batch = NoiseBatch(block_inputs=list(inputs), block_kwargs=list(kwargs), ref_logprobs=logits, ids=ids)
        replay = run_from(model, layers, tail, batch, 0, wide=False)
        if not torch.allclose(replay.float(), logits.float(), rtol=1e-4, atol=1e-4 * float(logits.abs().max())):
            raise BitplanError(f"replaying the decoder blocks of {type(model).__name__} does not reproduce its logits; "
                               "noise injection does not support this architecture: run with --noise-samples 0")
        if _low_precision(model):
            replay = run_from(model, layers, tail, batch, 0)
        # The reference is the replay itself, so that without noise the measured KL is exactly zero.
        batch.ref_logprobs = _log_probs(replay)
        cache.batches.append(batch)
    return cache


def _low_precision(model: nn.Module) -> bool:
    return next(model.parameters()).dtype in (torch.bfloat16, torch.float16)


def _wider(x: Any) -> Any:
    """Floating tensors (in tuples, lists and dicts too) as float32; anything else as it is."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    if isinstance(x, (tuple, list)):
        return type(x)(_wider(v) for v in x)
    if isinstance(x, dict):
        return {k: _wider(v) for k, v in x.items()}
    return x


@contextmanager
def widened(model: nn.Module, layers: nn.ModuleList, tail: _Tail) -> Iterator[None]:
    """While active, each decoder block, the final norm and the head of a bf16/fp16 model run in float32: their
    parameters are float32 copies for the duration of their own forward only (one block's at a time) and their
    inputs are upcast; the original tensors are put back after, so nothing is rounded twice. A float32 or float64
    model runs as it is."""
    if not _low_precision(model):
        yield
        return
    saved: dict[int, list[tuple[nn.Parameter, torch.Tensor]]] = {}

    def before(module, args, kwargs):
        saved[id(module)] = [(p, p.data) for p in module.parameters()]
        for p, data in saved[id(module)]:
            if data.dtype in (torch.bfloat16, torch.float16):
                p.data = data.float()
        return _wider(args), _wider(kwargs)

    def after(module, args, kwargs, output):
        for p, data in saved.pop(id(module), ()):
            p.data = data

    handles = []
    for module in (*layers, tail.norm, tail.head):
        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for entries in saved.values():   # a forward that raised
            for p, data in entries:
                p.data = data


def run_from(model: nn.Module, layers: nn.ModuleList, tail: _Tail, batch: NoiseBatch, block: int,
             wide: bool = True) -> torch.Tensor:
    """Logits from the cached input of `block` onwards, with the model's current weights; `block` = -1 runs the
    whole model from the token ids, `block` = number of blocks only the tail on the cached final hidden states.
    `wide`: a bf16/fp16 model computes in float32 (`widened`)."""
    if wide:
        with widened(model, layers, tail):
            return run_from(model, layers, tail, batch, block, wide=False)
    with torch.inference_mode():
        if block < 0:
            return model(input_ids=batch.ids, use_cache=False).logits
        if block >= len(layers) and batch.final_hidden is not None:
            return tail(batch.final_hidden)
        h = batch.block_inputs[block]
        for i in range(block, len(layers)):
            h = _block_output(layers[i](h, **batch.block_kwargs[i]))
        return tail(h)


def final_hidden(layers: nn.ModuleList, batch: NoiseBatch) -> torch.Tensor:
    """The last block's output from the cached input of block 0 (what the final norm and the head see), in the
    precision of the blocks as they are (inside `widened`: float32)."""
    with torch.inference_mode():
        h = batch.block_inputs[0]
        for i in range(len(layers)):
            h = _block_output(layers[i](h, **batch.block_kwargs[i]))
        return h


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax in float32 at least (float64 models keep float64: tiny ΔKL needs the digits)."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def mean_kl(ref_logprobs: torch.Tensor, logits: torch.Tensor) -> tuple[float, int]:
    """(Σ over tokens of KL(ref ‖ q), number of tokens)."""
    logq = _log_probs(logits)
    kl = (ref_logprobs.exp() * (ref_logprobs - logq)).sum(-1)
    return float(kl.sum(dtype=torch.float64)), kl.numel()


class NoiseMeter:
    """Measures α_noise for one layer at a time against a cache of the original model."""

    def __init__(self, model: nn.Module, cache: NoiseCache, levels: tuple[float, ...] = DEFAULT_LEVELS, seed: int = 0):
        if not levels or min(levels) <= 0:
            raise BitplanError(f"noise levels must be positive t² values, got {levels}")
        self.model, self.cache, self.levels, self.seed = model, cache, tuple(levels), seed
        self.layers = decoder_layers(model)
        self.tail = _Tail(model)

    def dkl(self, block: int) -> float:
        """Mean per-token KL of the model's current weights against the original, rerun from `block` (-1: the
        embedding, the whole model; number of blocks: the head alone)."""
        self._prepare(block)
        total, count = 0.0, 0
        for batch in self.cache.batches:
            ref = batch.full_logprobs if block < 0 else batch.ref_logprobs
            s, n = mean_kl(ref, run_from(self.model, self.layers, self.tail, batch, block))
            total, count = total + s, count + n
        return total / count

    def _prepare(self, block: int) -> None:
        """The reference an embedding or head measurement needs, from the unperturbed model, once."""
        for batch in self.cache.batches:
            if block < 0 and batch.full_logprobs is None:
                if batch.ids is None:
                    raise BitplanError("the noise cache holds no token ids to rerun the embedding from")
                with torch.inference_mode(), widened(self.model, self.layers, self.tail):
                    batch.full_logprobs = _log_probs(self.model(input_ids=batch.ids, use_cache=False).logits)
            if block >= len(self.layers) and batch.final_hidden is None:
                with widened(self.model, self.layers, self.tail):
                    batch.final_hidden = final_hidden(self.layers, batch)

    def measure(self, name: str, block: int) -> NoiseFit:
        weight = get_module(self.model, name).weight
        original = weight.detach().clone()
        # drawn on the host (the same Z on every device), then moved: Z is one layer's size
        z = torch.randn(original.shape, generator=generator(self.seed, "noise", name), dtype=torch.float32)
        z = z.to(original.device, original.dtype)
        # W + sZ is formed in float32 at least and rounded once into the weight's dtype. In bf16 that rounding adds
        # a relative error of at most 2⁻¹⁸ ≈ 4e-6 in t², against levels of 0.02 and 0.06: the t² below omits it.
        wide = torch.promote_types(original.dtype, torch.float32)
        self._prepare(block)  # before the weight changes
        w_norm = float(original.double().norm())
        z_norm = float(z.double().norm())
        t2s, dkls = [], []
        try:
            for level in self.levels:
                scale = w_norm * level ** 0.5 / original.numel() ** 0.5
                with torch.no_grad():
                    weight.copy_(original.to(wide) + scale * z.to(wide))
                t2s.append((scale * z_norm / w_norm) ** 2)
                dkls.append(self.dkl(block))
        finally:
            with torch.no_grad():
                weight.copy_(original)
        alpha, r2 = fit_through_origin(t2s, dkls)
        return NoiseFit(t2=t2s, dkl=dkls, alpha=alpha, r2=r2)
