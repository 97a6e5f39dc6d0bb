"""α_hessian of the token embedding and an untied head: the same round-to-nearest coefficient as the block
linears' (coefficients.py, docs/design.md),

    α_hessian = ½ (‖W‖²/mn) · Σ_w ‖G_w‖² / tokens,

with G_w the gradient of window w's summed cross-entropy under labels sampled from the model itself (the labels
the factor phase draws, `sample_labels`) with respect to the whole weight matrix. For a tied matrix G_w is the
gradient of the one shared tensor, both roles together: the cost of rounding it once.

Beside it, the traces of the two Kronecker sides, which is all these records need of the factors (never a
vocab × vocab matrix):
- head: tr H_I = Σ_t ‖x_t‖² (x: the final hidden states entering the head), tr H_O = Σ_t ‖∂L/∂logits_t‖²;
- embedding, the row-weighted form: the input side is the one-hot token, so H_I is the diagonal of the token
  counts in the calibration (tr H_I = tokens, the weights of the rows in `row_counts`), and the output side the
  gradient reaching the embedding's output (the input to block 0): tr H_O = Σ_t ‖g_t‖².
No adaptive-rounding gain is measured for either (their objectives take the round-to-nearest α: schema.py).

The same pass sums the second moment of the final hidden states, Σ_t h_t h_tᵀ (hidden × hidden, float64), per
calibration half of the windows: the input side of the matrix that computes the logits, one-sided LDLQ's H_I for
it (a tied embedding, rounded along the hidden dimension, or an untied head). An untied embedding gets none.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..models import LinearInfo, get_module, model_device
from .sketch import sample_labels


@dataclass
class InputMoment:
    """Σ_t h_t h_tᵀ of one calibration half's windows (float64), with their count and tokens."""
    xtx: torch.Tensor
    samples: int = 0
    tokens: int = 0


@dataclass
class OuterPass:
    records: dict[str, dict]                       # per record name, as `outer_gradients` returns them
    moment_of: str | None = None                   # the record the head's input moment belongs to
    moments: dict[str, InputMoment] = field(default_factory=dict)   # half → sums


def moment_owner(infos: list[LinearInfo]) -> LinearInfo | None:
    """The record whose rounding uses the head's input moment: the embedding when a head is tied to it, else an
    untied head; None when there is neither."""
    emb = next((i for i in infos if i.kind == "embedding"), None)
    if emb is not None and emb.ties:
        return emb
    return next((i for i in infos if i.kind == "head"), None)


def outer_gradients(model: nn.Module, infos: list[LinearInfo], windows: torch.Tensor, seed: int,
                    progress_task=None) -> dict[str, dict]:
    """Per record in `infos` (embedding and/or untied head): weight_sq_norm, trace_h_in, trace_h_out,
    grad_sq_per_token, alpha_hessian, tokens, and for the embedding the calibration's row counts (how many
    tokens of each id, the row weights). One forward/backward per window (G_w is per window)."""
    return outer_pass(model, infos, windows, seed, progress_task).records


def outer_pass(model: nn.Module, infos: list[LinearInfo], windows: torch.Tensor, seed: int, progress_task=None,
               halves: list[str] | None = None) -> OuterPass:
    """`outer_gradients`'s records and, when `halves` names each window's calibration half, the head input's
    second moment per half (`moment_owner`'s)."""
    if not infos:
        return OuterPass({})
    weights = {i.name: get_module(model, i.name).weight for i in infos}
    device = model_device(model)
    io: dict[str, dict] = {i.name: {"grad_sq": 0.0, "out_sq": 0.0, "in_sq": 0.0} for i in infos}
    counts = None
    emb = next((i for i in infos if i.kind == "embedding"), None)
    if emb is not None:
        counts = torch.zeros(emb.out_features, dtype=torch.float64, device=device)
    head = next((i for i in infos if i.kind == "head"), None)
    grads_of: dict[str, torch.Tensor] = {}
    hooks = []
    module_of = {i.name: get_module(model, i.name) for i in infos}
    if emb is not None:
        def emb_hook(module, args, out):
            out.register_hook(lambda g: grads_of.__setitem__("emb_out", g.detach()))
        hooks.append(module_of[emb.name].register_forward_hook(emb_hook))
    if head is not None:
        def head_hook(module, args, out):
            grads_of["head_in"] = args[0].detach()
            out.register_hook(lambda g: grads_of.__setitem__("head_out", g.detach()))
        hooks.append(module_of[head.name].register_forward_hook(head_hook))
    owner = moment_owner(infos) if halves is not None else None
    moments: dict[str, InputMoment] = {}
    if owner is not None:
        if len(halves) != windows.shape[0]:
            raise ValueError(f"{len(halves)} half labels for {windows.shape[0]} windows")
        hidden = owner.in_features
        moments = {h: InputMoment(torch.zeros(hidden, hidden, dtype=torch.float64, device=device))
                   for h in dict.fromkeys(halves)}
        if head is None:   # tied: the head module reads the final hidden states with the embedding's weight
            def tied_hook(module, args, out):
                grads_of["head_in"] = args[0].detach()
            hooks.append(get_module(model, owner.ties[0]).register_forward_hook(tied_hook))
    flags = {n: w.requires_grad for n, w in weights.items()}
    tokens = 0
    try:
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        for k in range(windows.shape[0]):
            ids = windows[k:k + 1].to(device)
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False).logits
                labels = sample_labels(logits, [k], seed)
                flat = logits.reshape(-1, logits.shape[-1])
                flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
                F.cross_entropy(flat, labels.reshape(-1), reduction="sum").backward()
            tokens += ids.numel()
            for name, w in weights.items():
                io[name]["grad_sq"] += float(w.grad.double().pow(2).sum())
                w.grad = None
            if emb is not None:
                io[emb.name]["out_sq"] += float(grads_of["emb_out"].double().pow(2).sum())
                counts += torch.bincount(ids.reshape(-1), minlength=emb.out_features).double()
            if head is not None:
                io[head.name]["out_sq"] += float(grads_of["head_out"].double().pow(2).sum())
                io[head.name]["in_sq"] += float(grads_of["head_in"].double().pow(2).sum())
            if owner is not None:
                h = grads_of["head_in"].reshape(-1, owner.in_features).double()
                m = moments[halves[k]]
                m.xtx += h.T @ h
                m.samples += 1
                m.tokens += h.shape[0]
            grads_of.clear()
            if progress_task is not None:
                progress_task.advance()
    finally:
        for h in hooks:
            h.remove()
        for name, w in weights.items():
            w.grad = None
            w.requires_grad_(flags[name])
    out: dict[str, dict] = {}
    for info in infos:
        W = weights[info.name].detach()
        wsq = float(W.double().pow(2).sum())
        per_token = io[info.name]["grad_sq"] / tokens
        m, n = info.shape
        rec = {"weight_sq_norm": wsq, "grad_sq_per_token": per_token, "tokens": tokens,
               "alpha_hessian": 0.5 * wsq / (m * n) * per_token, "trace_h_out": io[info.name]["out_sq"],
               "trace_h_in": float(tokens) if info.kind == "embedding" else io[info.name]["in_sq"]}
        if info.kind == "embedding":
            rec["rows_seen"] = int((counts > 0).sum())
        out[info.name] = rec
    return OuterPass(out, owner.name if owner is not None else None, moments)
