"""The profile's hessians/ folder: one safetensors file per layer with both calibration halves' factors.

File `hessians/<layer name>.safetensors`, float32 tensors (sums over chunks, not means):
    a.h_out [m, m], a.h_in [n, n], b.h_out, b.h_in
metadata (strings): "bitplan" = JSON with name, shape, sketch_chunk, and per half grad_sq (Σ_c‖G_c‖²),
samples (chunks) and tokens. Rounding uses the sum of the halves; the halves are kept for cross-validation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import BitplanError
from ..io import atomic_path

HESSIAN_DIR = "hessians"
FORMAT = "bitplan.hessians/1"


@dataclass
class LayerFactors:
    name: str
    h_out_a: torch.Tensor
    h_in_a: torch.Tensor
    h_out_b: torch.Tensor
    h_in_b: torch.Tensor
    grad_sq_a: float
    grad_sq_b: float
    samples_a: int
    samples_b: int
    tokens_a: int
    tokens_b: int
    sketch_chunk: int

    @property
    def h_out(self) -> torch.Tensor:
        return self.h_out_a + self.h_out_b

    @property
    def h_in(self) -> torch.Tensor:
        return self.h_in_a + self.h_in_b

    @property
    def grad_sq(self) -> float:
        return self.grad_sq_a + self.grad_sq_b

    @property
    def samples(self) -> int:
        return self.samples_a + self.samples_b

    @property
    def tokens(self) -> int:
        return self.tokens_a + self.tokens_b


def factors_path(profile_dir: str | Path, name: str) -> Path:
    return Path(profile_dir) / HESSIAN_DIR / f"{name}.safetensors"


def save_factors(path: str | Path, f: LayerFactors) -> None:
    def sym32(h: torch.Tensor) -> torch.Tensor:
        return ((h + h.T) / 2).to(torch.float32).contiguous()

    tensors = {"a.h_out": sym32(f.h_out_a), "a.h_in": sym32(f.h_in_a),
               "b.h_out": sym32(f.h_out_b), "b.h_in": sym32(f.h_in_b)}
    meta = {"format": FORMAT, "name": f.name, "shape": [f.h_out_a.shape[0], f.h_in_a.shape[0]],
            "sketch_chunk": f.sketch_chunk,
            "a": {"grad_sq": f.grad_sq_a, "samples": f.samples_a, "tokens": f.tokens_a},
            "b": {"grad_sq": f.grad_sq_b, "samples": f.samples_b, "tokens": f.tokens_b}}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"bitplan": json.dumps(meta)})


def read_factors(path: str | Path, dtype: torch.dtype = torch.float64) -> LayerFactors:
    path = Path(path)
    if not path.is_file():
        raise BitplanError(f"Hessian factors not found: {path} (profile without hessians/? re-run `bitplan profile`)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["bitplan"])
            t = {k: fh.get_tensor(k).to(dtype) for k in ("a.h_out", "a.h_in", "b.h_out", "b.h_in")}
    except (KeyError, ValueError, OSError, json.JSONDecodeError) as e:
        raise BitplanError(f"{path} is not a bitplan Hessian file ({type(e).__name__}: {e})") from None
    return LayerFactors(name=meta["name"], h_out_a=t["a.h_out"], h_in_a=t["a.h_in"], h_out_b=t["b.h_out"],
                        h_in_b=t["b.h_in"], grad_sq_a=meta["a"]["grad_sq"], grad_sq_b=meta["b"]["grad_sq"],
                        samples_a=meta["a"]["samples"], samples_b=meta["b"]["samples"],
                        tokens_a=meta["a"]["tokens"], tokens_b=meta["b"]["tokens"],
                        sketch_chunk=meta["sketch_chunk"])


def load_factors(profile_dir: str | Path, name: str, dtype: torch.dtype = torch.float64) -> LayerFactors:
    """The factors of layer `name` from a profile directory (what `apply` uses for YAQA rounding)."""
    return read_factors(factors_path(profile_dir, name), dtype)
