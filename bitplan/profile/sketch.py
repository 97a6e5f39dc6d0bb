"""One forward/backward pass of the factor sketch over a batch of calibration windows.

Labels are sampled from the model's own output distribution (the true Fisher of the KL to the original model,
not the empirical Fisher of the text), one generator per window, so results do not depend on batching. The loss
is the SUM of the cross-entropies, so each G_c is the gradient of the chunk's share of the summed loss.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BitplanError
from ..models import model_device

from .factors import ChunkStats, FactorSums, chunk_stats, input_moment, window_gram

# Where one layer's statistics of a batch go: (layer, stats, tokens, Σxxᵀ or None). The default adds them to `sums`; a
# distributed profile reduces them onto the layer's owner instead (profile/run.py).
Sink = Callable[[str, ChunkStats, int, torch.Tensor | None], None]
from .hooks import capture_grads
from .seeds import generator


@dataclass
class SketchTimes:
    """Seconds spent, for the benchmark: the whole pass, and the part inside the factor accumulation."""
    total: float = 0.0
    accumulate: float = 0.0
    batches: int = 0
    tokens: int = 0

    @property
    def forward_backward(self) -> float:
        return self.total - self.accumulate


def sample_labels(logits: torch.Tensor, window_ids: list[int], seed: int) -> torch.Tensor:
    """One label per position drawn from Categorical(logits) with a generator seeded by (seed, window), on the
    logits' device (a window's T × vocab probabilities never cross to the host; on a GPU the draws are the CUDA
    generator's, other labels than the CPU's from the same seed, and as valid).

    multinomial with replacement on softmax probabilities is exactly what Categorical.sample draws, but
    takes an explicit generator instead of the global one.
    """
    device = logits.device
    labels = torch.empty(logits.shape[:2], dtype=torch.long, device=device)
    for i, w in enumerate(window_ids):
        probs = torch.softmax(logits[i].detach().float(), dim=-1)
        labels[i] = torch.multinomial(probs, 1, True, generator=generator(seed, "labels", w, device=device)).squeeze(-1)
    return labels


def working_precision(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 activations and gradients as float32 (one layer's, one batch at a time): the factor sums are
    products of thousands of terms, which bf16's 8-bit mantissa would round away; float32 and float64 stay."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def accumulate_batch(model: nn.Module, modules: dict[str, nn.Module], ids: torch.Tensor, window_ids: list[int],
                     seed: int, chunk: int, sums: dict[str, FactorSums], times: SketchTimes | None = None,
                     labels: torch.Tensor | None = None, sink: Sink | None = None,
                     moments: bool = True) -> torch.Tensor:
    """Add one batch's chunk statistics to `sums` (every layer in `modules`), or hand them to `sink`;
    returns the labels used. `labels` overrides the sampled ones (tests use it to show that the text's own
    tokens differ). `moments` False skips Σxxᵀ and the window sums (FactorSums.zeros(..., moments=False)).
    The pass runs on the model's device (`ids` are moved there); the statistics are taken in float32 at least.
    """
    if sink is None:
        def sink(name: str, stats: ChunkStats, tokens: int, xtx: torch.Tensor | None) -> None:
            sums[name].add(stats, tokens=tokens, xtx=xtx)
    start = time.perf_counter()
    ids = ids.to(model_device(model))
    tokens = ids.numel()
    seen: set[str] = set()
    # q/k/v (and gate/up) share one input: its Σxxᵀ and window Grams are computed once. Each entry holds x
    # itself, so no other tensor can reuse the address and be mistaken for it within the batch (the upcast copy
    # of a bf16 x is made again per layer rather than kept: it would hold every block's float32 input at once).
    shared: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

    def on_grad(name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        t0 = time.perf_counter()
        seen.add(name)
        xw = working_precision(x)
        gw = g.to(xw.dtype)
        if not moments:
            sink(name, chunk_stats(xw, gw, chunk, window=False), tokens, None)
        else:
            key = (x.data_ptr(), tuple(x.shape))
            if key not in shared:
                shared[key] = (x, input_moment(xw), window_gram(xw) if chunk < x.shape[1] else None)
            _, xtx, x_gram = shared[key]
            sink(name, chunk_stats(xw, gw, chunk, x_gram), tokens, xtx)
        if times is not None:
            times.accumulate += time.perf_counter() - t0

    with torch.enable_grad(), capture_grads(model, modules, on_grad):
        logits = model(input_ids=ids, use_cache=False).logits
        if labels is None:
            labels = sample_labels(logits, window_ids, seed)
        # fp16/bf16 logits are lifted to fp32 for the loss; fp32 and fp64 keep their precision
        flat = logits.reshape(-1, logits.shape[-1])
        flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
        loss = F.cross_entropy(flat, labels.reshape(-1).to(flat.device), reduction="sum")
        loss.backward()
    missing = [n for n in modules if n not in seen]
    if missing:
        raise BitplanError(f"no gradient reached {missing[0]} ({len(missing)} layers in all): the model's "
                           "forward does not use it, so it has no sensitivity to profile")
    if times is not None:
        times.total += time.perf_counter() - start
        times.batches += 1
        times.tokens += tokens
    return labels
