"""The profile's hessians/ folder: per calibration half, one safetensors file per layer.

File `hessians/<half>/<layer name>.safetensors` (half `a` or `b`), float32 tensors, sums over chunks (not means):
    h_out [m, m]   Σ_c G_c G_cᵀ
    h_in  [n, n]   Σ_c G_cᵀ G_c
    xtx   [n, n]   Σ_t x_t x_tᵀ (the inputs' second moment: one-sided LDLQ's H_I; absent in older profiles)
metadata "bitplan" (JSON): format, name, half, sketch_chunk, grad_sq (Σ_c‖G_c‖²), window_grad_sq (Σ_w‖G_w‖² over
whole windows: the Fisher's trace; absent in older profiles), samples (chunks), tokens.
A half's files are written as soon as that half is accumulated, straight from memory. Rounding uses the sum of
the halves; the halves are kept for cross-validation (held-out predictions, shrinkage chosen on the other half).

The matrix that computes the logits (a tied embedding, under the embedding's name, or an untied head) has a
one-sided file of the same name: `xtx` alone, Σ_t h_t h_tᵀ of the final hidden states (the head's input) over
the outer phase's windows of that half, with metadata format, name, half, samples (windows), tokens and
"sides": "input". Its output side would be vocab × vocab, and is never kept.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import BitplanError
from ..io import atomic_path
from ..shards import Shards, read_header
from .factors import FactorSums

HESSIAN_DIR = "hessians"
FORMAT = "bitplan.hessians/1"
HALVES = ("a", "b")


@dataclass
class LayerFactors:
    name: str
    h_out_a: torch.Tensor | None   # None, with h_in_*, in a one-sided file (Σxxᵀ alone)
    h_in_a: torch.Tensor | None
    h_out_b: torch.Tensor | None
    h_in_b: torch.Tensor | None
    xtx_a: torch.Tensor | None
    xtx_b: torch.Tensor | None
    grad_sq_a: float
    grad_sq_b: float
    samples_a: int
    samples_b: int
    tokens_a: int
    tokens_b: int
    sketch_chunk: int
    window_grad_sq_a: float | None = None
    window_grad_sq_b: float | None = None

    @property
    def one_sided(self) -> bool:
        """Only Σxxᵀ is kept (the head's input second moment): one-sided LDLQ's factor, no Kronecker pair."""
        return self.h_out_a is None or self.h_out_b is None

    @property
    def h_out(self) -> torch.Tensor | None:
        return None if self.one_sided else self.h_out_a + self.h_out_b

    @property
    def h_in(self) -> torch.Tensor | None:
        return None if self.one_sided else self.h_in_a + self.h_in_b

    @property
    def xtx(self) -> torch.Tensor | None:
        return None if self.xtx_a is None or self.xtx_b is None else self.xtx_a + self.xtx_b

    def half(self, half: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(h_out, h_in, xtx) of one calibration half."""
        return ((self.h_out_a, self.h_in_a, self.xtx_a) if half == "a" else (self.h_out_b, self.h_in_b, self.xtx_b))

    @property
    def grad_sq(self) -> float:
        return self.grad_sq_a + self.grad_sq_b

    @property
    def window_grad_sq(self) -> float | None:
        """Σ_w ‖G_w‖² over both halves' windows, or None for a profile written before it was kept."""
        if self.window_grad_sq_a is None or self.window_grad_sq_b is None:
            return None
        return self.window_grad_sq_a + self.window_grad_sq_b

    @property
    def samples(self) -> int:
        return self.samples_a + self.samples_b

    @property
    def tokens(self) -> int:
        return self.tokens_a + self.tokens_b


def factors_path(profile_dir: str | Path, name: str, half: str) -> Path:
    return Path(profile_dir) / HESSIAN_DIR / half / f"{name}.safetensors"


def save_half_factors(path: str | Path, name: str, half: str, sums: FactorSums, sketch_chunk: int) -> None:
    def sym32(h: torch.Tensor) -> torch.Tensor:   # symmetrized and rounded where the sums are, then to the host
        return ((h + h.T) / 2).to(torch.float32).cpu().contiguous()

    meta = {"format": FORMAT, "name": name, "half": half, "sketch_chunk": sketch_chunk,
            "grad_sq": sums.grad_sq, "window_grad_sq": sums.window_grad_sq, "samples": sums.samples,
            "tokens": sums.tokens}
    with atomic_path(path) as tmp:
        tensors = {"h_out": sym32(sums.h_out), "h_in": sym32(sums.h_in)}
        if sums.xtx is not None:
            tensors["xtx"] = sym32(sums.xtx)
        save_file(tensors, str(tmp),
                  metadata={"bitplan": json.dumps(meta)})


def save_input_moment(path: str | Path, name: str, half: str, xtx: torch.Tensor, tokens: int, samples: int) -> None:
    """A one-sided file: Σ_t h_t h_tᵀ (float64 sums, stored float32 and symmetrized as the block linears' xtx)."""
    meta = {"format": FORMAT, "name": name, "half": half, "sides": "input", "samples": samples, "tokens": tokens}
    with atomic_path(path) as tmp:
        save_file({"xtx": ((xtx + xtx.T) / 2).to(torch.float32).cpu().contiguous()}, str(tmp),
                  metadata={"bitplan": json.dumps(meta)})


def stored_sides(profile_dir: str | Path, name: str) -> str | None:
    """What the profile keeps of `name` in both halves: "both" (the Kronecker factors), "input" (Σxxᵀ alone) or
    None (no file in a half). Reads the files' headers only; a damaged file counts as "both" (loading it then
    says what is wrong)."""
    paths = [factors_path(profile_dir, name, half) for half in HALVES]
    if not all(p.is_file() for p in paths):
        return None
    try:
        for p in paths:
            with safe_open(str(p), framework="pt") as fh:
                if "h_out" not in fh.keys():
                    return "input"
    except (SafetensorError, OSError):
        return "both"
    return "both"


@contextmanager
def _half_file(path: str | Path):
    """An open hessians file and its metadata; a missing, damaged or foreign file fails with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise BitplanError(f"Hessian factors not found: {path} (a profile without hessians/? re-run `bitplan profile`)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            yield fh, json.loads((fh.metadata() or {})["bitplan"])
    except SafetensorError as e:   # truncated (a full disk, a copy cut short) or overwritten
        profile = path.parent.parent.parent
        raise BitplanError(f"the Hessian file {path} is damaged ({e}); re-make the profile's factors: "
                           f"`bitplan profile MODEL --out {profile} --overwrite` with the settings it was made "
                           "with") from None
    except (KeyError, ValueError, OSError, json.JSONDecodeError) as e:
        raise BitplanError(f"{path} is not a bitplan Hessian file ({type(e).__name__}: {e})") from None


def read_half_factors(path: str | Path, dtype: torch.dtype = torch.float64,
                      device: torch.device | str = "cpu") -> tuple[FactorSums, dict]:
    """One half's sums (in `dtype` on `device`); a one-sided file (Σxxᵀ alone) gives h_out and h_in None and
    grad_sq 0."""
    with _half_file(path) as (fh, meta):
        if meta.get("sides") == "input":
            h_out = h_in = None
            meta = {"grad_sq": 0.0, "sketch_chunk": 0, **meta}
        else:
            h_out, h_in = (fh.get_tensor(k).to(device, dtype) for k in ("h_out", "h_in"))
        xtx = fh.get_tensor("xtx").to(device, dtype) if "xtx" in fh.keys() else None
    return FactorSums(h_out, h_in, xtx, meta["grad_sq"], meta["samples"], meta["tokens"],
                      meta.get("window_grad_sq")), meta


@dataclass
class SummedFactors:
    """The tensors one rounding needs, each the sum of both halves in float64: nothing else is read."""
    tensors: dict[str, torch.Tensor]    # of "h_out", "h_in", "xtx": those asked for
    samples: int                        # both halves' samples
    one_sided: bool                     # the file keeps Σxxᵀ alone


def factor_samples(profile_dir: str | Path, name: str) -> int:
    """Both halves' samples of `name`'s factors, from the files' metadata alone."""
    total = 0
    for half in HALVES:
        with _half_file(factors_path(profile_dir, name, half)) as (_, meta):
            total += meta["samples"]
    return total


def read_summed_factors(profile_dir: str | Path, name: str, keys: tuple[str, ...],
                        device: torch.device | str = "cpu") -> SummedFactors:
    """The sums over both halves of `keys` ("h_out", "h_in", "xtx"), float64 on `device`: each half's float32
    tensor is read from its file a block of rows at a time (plain reads, bitplan.shards) and added into one float64
    buffer (the same values as LayerFactors' sums), so a layer's rounding holds one n × n buffer per key and
    never the factors it does not use, nor a float32 copy or mapped pages of one."""
    sums: dict[str, torch.Tensor] = {}
    samples, one_sided = 0, False
    for half in HALVES:
        path = factors_path(profile_dir, name, half)
        with _half_file(path) as (fh, meta):    # the header, checked; the data is read below
            samples += meta["samples"]
            one_sided = meta.get("sides") == "input"
            stored = set(fh.keys())
        for key in keys:
            if key not in stored and one_sided:
                raise BitplanError(f"the profile keeps only Σxxᵀ for {name} (its output side would be "
                                   "vocabulary-sized): it is rounded with ldlq")
            if key not in stored:
                what = "Σxxᵀ (needed by --rounding ldlq)" if key == "xtx" else key
                raise BitplanError(f"the profile's factors for {name} lack {what} ({path}): the profile was "
                                   "made by an older bitplan; re-run `bitplan profile`")
        infos = read_header(path)[0]
        for key in keys:
            shards = Shards(path.parent, {key: infos[key]})
            total = sums.setdefault(key, torch.empty(infos[key].shape, dtype=torch.float64, device=device))
            row = 0
            for block in shards.chunks(key):
                rows = total[row:row + block.shape[0]]
                if half == HALVES[0]:
                    rows.copy_(block)
                else:
                    rows.add_(block.to(device))
                row += block.shape[0]
                del block, rows   # before the next block is read
    return SummedFactors(sums, samples, one_sided)


def load_factors(profile_dir: str | Path, name: str, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu") -> LayerFactors:
    """Both halves' factors of layer `name` from a profile directory (what `apply` uses for YAQA rounding), in
    `dtype` on `device`."""
    (a, meta), (b, _) = (read_half_factors(factors_path(profile_dir, name, h), dtype, device) for h in HALVES)
    return LayerFactors(name=name, h_out_a=a.h_out, h_in_a=a.h_in, h_out_b=b.h_out, h_in_b=b.h_in,
                        xtx_a=a.xtx, xtx_b=b.xtx,
                        grad_sq_a=a.grad_sq, grad_sq_b=b.grad_sq, samples_a=a.samples, samples_b=b.samples,
                        tokens_a=a.tokens, tokens_b=b.tokens, sketch_chunk=meta["sketch_chunk"],
                        window_grad_sq_a=a.window_grad_sq, window_grad_sq_b=b.window_grad_sq)
