"""bitplan: plan and produce non-uniform low-bit quantizations of large language models.

The Python API mirrors the CLI (profile → solve → apply → eval):

    import bitplan
    model = bitplan.open_model("smollm2-135m")        # a plain model, or a bitplan checkpoint folder
    result = bitplan.eval(reference="smollm2-135m", candidate="out/", data="wikitext2")

Submodules load lazily, so `import bitplan` stays fast and a notebook pays only for what it uses.
"""
from __future__ import annotations

import importlib

from .errors import BitplanError

__version__ = "0.1.0"

# public name -> (module, attribute)
_API = {
    "open_model": ("bitplan.loading", "open_model"),
    "load_model": ("bitplan.models", "load_model"),
    "load_quantized": ("bitplan.apply.checkpoint", "load_quantized"),
    "find_linears": ("bitplan.models", "find_linears"),
    "token_windows": ("bitplan.data", "token_windows"),
    "load_texts": ("bitplan.data", "load_texts"),
    "eval": ("bitplan.evaluate", "evaluate"),
    "evaluate": ("bitplan.evaluate", "evaluate"),
    "get_format": ("bitplan.formats", "get_format"),
    "load_profile": ("bitplan.profile.schema", "load_profile"),
}

__all__ = ["BitplanError", *_API]


def __getattr__(name: str):
    if name in _API:
        module, attr = _API[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'bitplan' has no attribute {name!r}")
