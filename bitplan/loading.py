"""Opening "a model" as eval and the CLI mean it: a bitplan checkpoint or a plain model.

bitplan.models loads plain causal LMs (built-in names, folders, .gguf files, cached hub ids) and knows nothing of
checkpoints; bitplan.apply.checkpoint loads checkpoints and builds on bitplan.models. This module stands above both
and picks between them, so neither has to import the other's side.
"""
from __future__ import annotations

import os

import torch

from .apply.checkpoint import is_checkpoint, load_quantized
from .models import LoadedModel, load_model, resolve_model_path


def open_model(spec: str | os.PathLike | LoadedModel, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A bitplan checkpoint folder (its quantized modules as QuantizedLinear), or a plain model loaded by
    `bitplan.models.load_model` in `dtype`. A LoadedModel is returned as it is."""
    if isinstance(spec, LoadedModel):
        return spec
    path = resolve_model_path(str(spec))
    if is_checkpoint(path):
        return load_quantized(path)
    return load_model(spec, dtype)
