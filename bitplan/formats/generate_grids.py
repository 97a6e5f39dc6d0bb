"""Generate the Gaussian grids and measure every format's mse_q (package data).

    python -m bitplan.formats.generate_grids [--work DIR] [--only p2_n256,...] [--eval-samples N]
    python -m bitplan.formats.generate_grids --measure 'sint*,uint*'   # only these formats' mse_q, no grids

Writes `bitplan/formats/data/grids.npz` (float32 [n, p] tables), `grids.json` (each grid's Gaussian MSE measured
on fresh samples, not the training ones) and `formats.json` (every format's relative MSE on i.i.d. N(0, 1)
matrices). Each grid is also saved in the work directory as it finishes; a rerun skips those.

- p = 1: exact Lloyd–Max on the N(0, 1) density (fixed point of the centroid map, solved to 1e-14).
- p ≥ 2: Lloyd iterations on fresh Monte-Carlo samples each step. Samples are drawn from N(0, (1 + 2/p) I)
  — the high-resolution optimal point density φ^{p/(p+2)} — and weighted by φ(x)/q(x) ≤ (1 + 2/p)^{p/2}, so every
  cell, tail cells included, sees about the same number of samples; samples come in antithetic pairs ±x
  (less variance). Starts are random draws from that density, deliberately not centrally symmetric: a
  symmetric start cannot put a point at the origin, and the best small grids have one (p = 2, n = 16: 0.1100
  from symmetric starts against 0.1075 from free ones). Small grids use several random starts (Lloyd's local
  optima matter there); the final phase takes more samples per cell and averages the last iterates, which
  removes most of the Monte-Carlo noise.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import root
from scipy.spatial import cKDTree
from scipy.special import ndtr, ndtri

from ..io import atomic_path, write_json
from .grids import all_grid_keys, gaussian_mse, grid_key

DATA_DIR = Path(__file__).parent / "data"
TRAIN_SEED = 20250101
EVAL_SEED = 777_000_001  # grid MSE in grids.json: different from every training stream
FORMAT_SEED = 888_000_001  # mse_q of formats in formats.json


# ----------------------------------------------------------------------------------------------------------
# p = 1: Lloyd–Max
# ----------------------------------------------------------------------------------------------------------

def _phi(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _centroids_1d(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive half of a symmetric scalar quantizer: cell centroids and probabilities."""
    t = np.concatenate([[0.0], (c[1:] + c[:-1]) / 2, [np.inf]])
    sf = ndtr(-t)  # survival function: accurate in the tail
    P = sf[:-1] - sf[1:]
    return (_phi(t[:-1]) - _phi(t[1:])) / P, P


def lloyd_max(n: int) -> tuple[np.ndarray, float]:
    """The n-level Lloyd–Max quantizer of N(0, 1) (n even) and its exact MSE."""
    h = n // 2
    c = math.sqrt(3) * ndtri(0.5 + (np.arange(h) + 0.5) / n)  # high-resolution start: density ∝ φ^{1/3}
    for _ in range(200):
        c, _ = _centroids_1d(c)
    sol = root(lambda x: _centroids_1d(x)[0] - x, c, method="hybr", options={"xtol": 1e-15})
    c = np.sort(sol.x)
    cc, P = _centroids_1d(c)
    if np.abs(cc - c).max() > 1e-12:
        raise RuntimeError(f"Lloyd–Max n={n} did not converge")
    levels = np.concatenate([-c[::-1], c])
    return levels[:, None], float(1.0 - 2.0 * (cc * cc * P).sum())


# ----------------------------------------------------------------------------------------------------------
# p ≥ 2: sampled Lloyd
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    starts: int  # random starts, best kept after the first phase
    iters: int  # first phase: Lloyd steps
    per_cell: int  # samples per grid point per step in the first phase
    final_iters: int  # second phase, iterates averaged
    final_per_cell: int


def schedule_for(p: int, n: int) -> Schedule:
    # Budgeted for ≈ 1.8 G samples in all (≈ 20–40 min on 2 cores). Measured on p = 3: the first phase levels
    # off after ≈ 60–100 steps at ≈ 1/per_cell above the final MSE (Monte-Carlo noise of the centroids); the
    # averaged final phase removes that noise. Over-relaxation did not help at this noise level.
    if n <= 256:
        return Schedule(starts=8, iters=120, per_cell=300, final_iters=30, final_per_cell=3000)
    return Schedule(starts=1, iters=150, per_cell=150, final_iters=30, final_per_cell=1000)


def _weighted_samples(rng: np.random.Generator, N: int, p: int) -> tuple[np.ndarray, np.ndarray]:
    s2 = 1.0 + 2.0 / p
    y = rng.standard_normal((N // 2, p)) * math.sqrt(s2)
    y = np.concatenate([y, -y])  # antithetic pairs: less variance in the centroids
    w = np.exp(-0.5 * (y * y).sum(1) * (1.0 - 1.0 / s2))  # φ / q up to a constant
    return y, w


def _lloyd_step(C: np.ndarray, rng: np.random.Generator, N: int, workers: int, chunk: int = 1 << 20) -> np.ndarray:
    n, p = C.shape
    tree = cKDTree(C)
    S = np.zeros((n, p))
    W = np.zeros(n)
    done = 0
    while done < N:
        m = min(chunk, N - done)
        y, w = _weighted_samples(rng, m, p)
        _, idx = tree.query(y, workers=workers)
        W += np.bincount(idx, weights=w, minlength=n)
        for d in range(p):
            S[:, d] += np.bincount(idx, weights=w * y[:, d], minlength=n)
        done += m
    out = C.copy()
    hit = W > 0
    out[hit] = S[hit] / W[hit, None]
    return out


def _validation_mse(C: np.ndarray, rng: np.random.Generator, N: int, workers: int) -> float:
    x = rng.standard_normal((N, C.shape[1]))
    d, _ = cKDTree(C).query(x, workers=workers)
    return float((d * d).mean() / C.shape[1])


def lloyd_grid(p: int, n: int, seed: int, sched: Schedule, workers: int, log=print) -> np.ndarray:
    rng = np.random.default_rng([seed, p, n])
    s2 = 1.0 + 2.0 / p
    best, best_mse = None, math.inf
    for start in range(sched.starts):
        C = rng.standard_normal((n, p)) * math.sqrt(s2)
        for _ in range(sched.iters):
            C = _lloyd_step(C, rng, sched.per_cell * n, workers)
        mse = _validation_mse(C, rng, max(200_000, 200 * n), workers)
        log(f"  p={p} n={n} start {start}: validation MSE {mse:.6g}")
        if mse < best_mse:
            best, best_mse = C, mse
    C, avg = best, np.zeros_like(best)
    for _ in range(sched.final_iters):
        C = _lloyd_step(C, rng, sched.final_per_cell * n, workers)
        avg += C
    return avg / sched.final_iters


def _canonical_order(C: np.ndarray) -> np.ndarray:
    """Sort points (p = 1: ascending; else by norm, then coordinates) so tables are stable to read."""
    if C.shape[1] == 1:
        return C[np.argsort(C[:, 0], kind="stable")]
    keys = [C[:, d] for d in range(C.shape[1] - 1, -1, -1)] + [np.round((C * C).sum(1), 9)]
    return C[np.lexsort(keys)]


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------

def generate(work: Path, only: set[str] | None, eval_samples: int, workers: int, log=print) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    meta: dict[str, dict] = {}
    tables: dict[str, np.ndarray] = {}
    for p, n in all_grid_keys():
        key = grid_key(p, n)
        path = work / f"{key}.npy"
        info_path = work / f"{key}.json"
        if path.exists() and info_path.exists() and (only is None or key not in only):
            C, info = np.load(path), json.loads(info_path.read_text())
        elif only is not None and key not in only:
            raise SystemExit(f"{key} is not in the work directory {work}; generate it first (drop --only)")
        else:
            t0 = time.time()
            if p == 1:
                C, exact = lloyd_max(n)
                info = {"method": "Lloyd-Max on the N(0,1) density", "exact_mse": exact}
            else:
                sched = schedule_for(p, n)
                C = lloyd_grid(p, n, TRAIN_SEED, sched, workers, log)
                info = {"method": "sampled Lloyd, importance-weighted antithetic N(0, (1+2/p)I) samples",
                        "train_seed": TRAIN_SEED, "schedule": sched.__dict__}
            C = _canonical_order(C.astype(np.float32))
            info["seconds"] = round(time.time() - t0, 1)
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, C)
            write_json(info_path, info)
            log(f"{key}: generated in {info['seconds']:.0f} s ({time.strftime('%H:%M:%S')})")
        # the shipped float32 table is what gets measured, on samples no training step saw
        mse = gaussian_mse(C, eval_samples, seed=EVAL_SEED + 1000 * p + int(math.log2(n)))
        tables[key] = C
        meta[key] = {"p": p, "n": n, "bits": math.log2(n) / p, "mse": mse, "eval_samples": eval_samples,
                      "shannon_bound": 4.0 ** (-math.log2(n) / p), **info}
        log(f"{key}: Gaussian MSE {mse:.6g} ({eval_samples} fresh samples)")
    return {"tables": tables, "meta": meta}


def measure_formats(m: int, n: int, seed: int, log=print, names: list[str] | None = None) -> dict[str, dict]:
    """Relative MSE ‖W − Ŵ‖² / ‖W‖² of every format (or of `names`) on one i.i.d. N(0, 1) matrix [m, n]."""
    from .registry import all_format_names, build_format

    W = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    ref = float(W.double().pow(2).sum())
    out = {}
    for name in names or all_format_names():
        fmt = build_format(name, float("nan"))
        err = float((fmt.dequantize(fmt.quantize(W)).double() - W.double()).pow(2).sum())
        out[name] = {"mse_q": err / ref, "shape": [m, n], "seed": seed}
        log(f"{name}: mse_q {err / ref:.6g}")
    return out


def select_names(patterns: str) -> list[str]:
    """Format names matching a comma list of names or shell patterns, in catalogue order."""
    from fnmatch import fnmatchcase

    from .registry import all_format_names

    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    names = [n for n in all_format_names() if any(fnmatchcase(n, p) for p in pats)]
    if not names:
        raise SystemExit(f"--measure {patterns!r} matches no format name")
    return names


def _default_work() -> Path:
    import os

    import platformdirs

    root = os.environ.get("BITPLAN_CACHE") or platformdirs.user_cache_dir("bitplan")
    return Path(root) / "grid-work"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bitplan.formats.generate_grids", description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=_default_work(), help="per-grid results; finished grids are skipped")
    ap.add_argument("--only", default=None, help="comma-separated grid keys to (re)generate, e.g. p2_n256")
    ap.add_argument("--eval-samples", type=int, default=4_000_000, help="fresh N(0, I_p) vectors per grid MSE")
    ap.add_argument("--format-shape", default="512x3072", help="m x n of the N(0,1) matrix measuring mse_q")
    ap.add_argument("--workers", type=int, default=torch.get_num_threads())
    ap.add_argument("--ggml", action="store_true",
                    help="only measure the ggml formats' mse_q and add them to formats.json (no grids)")
    ap.add_argument("--measure", default=None,
                    help="only measure these formats' mse_q (comma list, shell patterns such as 'sint*') and "
                         "add or replace them in formats.json (no grids); other entries are kept as they are")
    args = ap.parse_args(argv)
    if args.ggml or args.measure:
        from .ggml import GGML_NAMES

        m, n = (int(v) for v in args.format_shape.lower().split("x"))
        names = list(GGML_NAMES) if args.ggml else select_names(args.measure)
        table = json.loads((DATA_DIR / "formats.json").read_text())
        table["formats"].update(measure_formats(m, n, FORMAT_SEED, names=names))
        write_json(DATA_DIR / "formats.json", table)
        return
    only = set(args.only.split(",")) if args.only else None
    t0 = time.time()
    res = generate(args.work, only, args.eval_samples, args.workers)
    with atomic_path(DATA_DIR / "grids.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **res["tables"])
    write_json(DATA_DIR / "grids.json", {"version": 1, "grids": res["meta"]})
    # the format measurement reads the tables just written
    from . import grids, registry

    grids._tables.cache_clear()
    grids.grid_encoder.cache_clear()
    registry.measured_mse.cache_clear()
    m, n = (int(v) for v in args.format_shape.lower().split("x"))
    formats = measure_formats(m, n, FORMAT_SEED)
    write_json(DATA_DIR / "formats.json", {"version": 1, "formats": formats})
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
