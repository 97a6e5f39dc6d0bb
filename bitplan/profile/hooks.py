"""Capture of each linear layer's input x and output gradient g = ∂ℓ/∂y without any weight gradient.

Weights keep requires_grad False; the embedding output is made a leaf that requires grad, so autograd
propagates activation gradients only. A forward hook keeps x (a reference, not a copy: q/k/v share theirs) and
puts a tensor hook on the layer output y that hands (x, g) to a callback during backward, after which x is
dropped.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import BitplanError

OnGrad = Callable[[str, torch.Tensor, torch.Tensor], None]


@contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """requires_grad False on every parameter for the duration (restored after): no weight gradients."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def capture_grads(model: nn.Module, modules: dict[str, nn.Module], on_grad: OnGrad) -> Iterator[None]:
    """While active, every forward through `modules` calls on_grad(name, x, g) in the following backward."""
    handles = []

    def make_hook(name: str):
        def hook(module, args, output):
            if not torch.is_grad_enabled():
                return None
            if not output.requires_grad:
                raise BitplanError(f"{name}: its output carries no gradient; cannot capture ∂ℓ/∂y")
            x = args[0].detach()
            output.register_hook(lambda g: on_grad(name, x, g.detach()))
            return None
        return hook

    def embedding_leaf(module, args, output):
        # A leaf that requires grad lets backward run through frozen weights.
        return output.detach().requires_grad_(torch.is_grad_enabled())

    with frozen_weights(model):
        handles.append(model.get_input_embeddings().register_forward_hook(embedding_leaf))
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
