"""`ProfileDir`: a profile folder as apply reads it.

    profile.json        the records (calibration, each layer's shrinkage λs chosen by the held-out gain)
    sensitivity.csv     the same per layer, for people
    hessians/a, b       each calibration half's Kronecker factors (hessians.py); shipped profiles leave them out

Apply needs the factors for adaptive rounding (yaqa, ldlq), the profile's λs so that it need not redo the
held-out LDLs, and the calibration's description for the checkpoint's metadata. A folder may hold factors
without profile.json (apply then chooses λ itself) or profile.json without factors (round to nearest only).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..errors import BitplanError
from ..heldout import Shrinkage
from .hessians import (HALVES, HESSIAN_DIR, LayerFactors, SummedFactors, factor_samples, factors_path, load_factors,
                       read_summed_factors)
from .schema import Profile, load_profile

PROFILE_FILE = "profile.json"


@dataclass(frozen=True)
class ProfileDir:
    path: Path

    @classmethod
    def of(cls, path: "str | Path | ProfileDir | None") -> "ProfileDir | None":
        """A folder given as a path (None or "" for none)."""
        return path if isinstance(path, ProfileDir) or not path else cls(Path(path))

    @classmethod
    def recorded_in(cls, recorded: dict | None, plan_path: str | Path) -> "ProfileDir | None":
        """The profile a plan names (`plan.profile`: its "path"), relative paths from the cwd, then from the
        plan's folder; None when the plan names none or it is not there."""
        given = (recorded or {}).get("path")
        if not given:
            return None
        p = Path(given)
        for candidate in (p, Path(plan_path).parent / p):
            if candidate.exists():
                return cls(candidate if candidate.is_dir() else candidate.parent)
        return None

    @property
    def has_hessians(self) -> bool:
        return (self.path / HESSIAN_DIR).is_dir()

    @cached_property
    def profile(self) -> Profile | None:
        """profile.json's records, or None when the folder has none."""
        return load_profile(self.path) if (self.path / PROFILE_FILE).is_file() else None

    @property
    def calibration(self) -> dict:
        """The calibration's description (source, sha256, windows, halves); {} without profile.json."""
        return self.profile.calibration if self.profile is not None else {}

    def factors(self, layer: str, rounding: str) -> LayerFactors:
        """Both calibration halves' factors of `layer`, with Σxxᵀ when `rounding` is ldlq (one-sided LDLQ's H_I)."""
        f = load_factors(self.path, layer)
        if f.one_sided and rounding != "ldlq":
            raise BitplanError(f"the profile keeps only Σxxᵀ for {layer} (its output side would be vocabulary-sized): "
                               f"it is rounded with ldlq, not {rounding}")
        if rounding == "ldlq" and f.xtx is None:
            raise BitplanError(f"the profile's factors for {layer} lack Σxxᵀ (needed by --rounding ldlq): the profile "
                               "was made by an older bitplan; re-run `bitplan profile`")
        return f

    def summed_factors(self, layer: str, rounding: str) -> SummedFactors:
        """What `rounding` rounds `layer` with, each summed over the halves in float64 (ldlq: Σxxᵀ; yaqa: H_I and
        H_O), reading no other factor: a layer's rounding then holds one n × n buffer per side."""
        return read_summed_factors(self.path, layer, ("xtx",) if rounding == "ldlq" else ("h_in", "h_out"))

    def factor_samples(self, layer: str) -> int:
        """Both halves' factor samples of `layer`, from the files' metadata."""
        return factor_samples(self.path, layer)

    def factors_id(self, layer: str) -> str:
        """Changes when a layer's factor files do (size and modification time), without reading them."""
        paths = [factors_path(self.path, layer, half) for half in HALVES]
        stamps = [f"{st.st_size}-{st.st_mtime_ns}" for st in (p.stat() for p in paths if p.is_file())]
        return f"{self.path}:{layer}:" + ":".join(stamps)  # a missing file is reported by `factors`

    def shrinkage(self, layer: str) -> Shrinkage | None:
        """The λs of H_O and H_I the profile's layer phase chose for `layer` by the held-out gain, with the factor
        samples they were chosen on; None when profile.json is missing or holds no choice for the layer."""
        return self._shrinkages.get(layer)

    def chosen_shrinkage(self, layer: str, target: str) -> Shrinkage | None:
        """The profile's λs of `layer` when they were chosen on these factors (same samples) toward `target`;
        None when apply has to choose them itself, from both halves' factors (all read at once for that)."""
        known = self.shrinkage(layer)
        if known is None or known.target != target or not self.has_hessians:
            return None
        return known if known.samples == self.factor_samples(layer) else None

    @cached_property
    def _shrinkages(self) -> dict[str, Shrinkage]:
        if self.profile is None:
            return {}
        out = {}
        for r in self.profile.layers:
            x = r.extra
            if x.get("shrink_out") is None or x.get("shrink_in") is None or not x.get("shrink_target"):
                continue
            out_gains, in_gains = ({float(k): v for k, v in (x.get(key) or {}).items()}
                                   for key in ("shrink_gains", "shrink_in_gains"))
            out[r.name] = Shrinkage(float(x["shrink_out"]), float(x["shrink_in"]), x["shrink_target"], out_gains,
                                    in_gains, x.get("n_samples"))
        return out
