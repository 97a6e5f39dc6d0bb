"""Sensitivity profiles: Kronecker-factored Hessians, linearity coefficients, the sensitivity report.

    from bitplan.profile import profile_model, load_profile
    profile = profile_model("smollm2-135m", "calib.jsonl", samples=128, seqlen=256, out_dir="profiles/x")

Attributes load lazily: bitplan.models imports bitplan.profile.schema, and the runner imports bitplan.models.
"""
from __future__ import annotations

_LAZY = {
    "profile_model": ".run",
    "default_out_dir": ".run",
    "Profile": ".schema",
    "LayerRecord": ".schema",
    "load_profile": ".schema",
    "load_factors": ".hessians",
    "LayerFactors": ".hessians",
    "rotation_seeds": ".relerr",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
