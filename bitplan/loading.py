"""Opening "a model" as eval and the CLI mean it: a bitplan checkpoint or a plain model.

bitplan.models loads plain causal LMs (built-in names, folders, .gguf files, cached hub ids) and knows nothing of
checkpoints; bitplan.apply.checkpoint loads checkpoints and builds on bitplan.models. This module stands above both
and picks between them, so neither has to import the other's side.
"""
from __future__ import annotations

import os

import torch

from .apply.checkpoint import is_checkpoint, load_quantized
from .devices import resolve_device, resolve_dtype
from .io import read_json
from .models import LoadedModel, load_model, resolve_model_path


def open_model(spec: str | os.PathLike | LoadedModel, dtype: torch.dtype | str = torch.float32,
               device: torch.device | str = "cpu") -> LoadedModel:
    """A bitplan checkpoint folder (its quantized modules as QuantizedLinear), or a plain model loaded by
    `bitplan.models.load_model` in `dtype` on `device`. A LoadedModel is returned as it is.

    A checkpoint's packed codes, scales and codebooks keep their stored dtypes (QuantizedLinear computes in its
    input's dtype); its other weights (norms, an fp16 head or embedding) are cast to `dtype`."""
    if isinstance(spec, LoadedModel):
        return spec
    device = resolve_device(device)
    path = resolve_model_path(str(spec))
    if not is_checkpoint(path):
        return load_model(spec, dtype, device)
    lm = load_quantized(path)
    dtype = resolve_dtype(dtype, device, read_json(path / "config.json", "checkpoint config"))
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        if dtype != torch.float32:
            # A quantized embedding dequantizes to float32 rows; the blocks after it take `dtype`.
            lm.model.get_input_embeddings().register_forward_hook(lambda m, args, out: out.to(dtype))
    lm.model.to(device)
    return lm
