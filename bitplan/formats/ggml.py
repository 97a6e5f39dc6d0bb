"""ggml's block formats (`q8_0`, `q4_0`, `q4_1`, `q5_0`, `q5_1`, `iq4_nl`, `q2_K`, `q3_K`, `q4_K`, `q5_K`, `q6_K`,
`iq4_xs`): the codes and scales of llama.cpp's GGUF tensors, bit for bit.

Every weight of a row decodes as  value = level(code) · scale + zero  in float32, where
- level is code − offset for the linear types and IQ4_NL's table (−127 … 113) for `iq4_nl` / `iq4_xs`;
- scale is the block's fp16 d (32-weight types) or the float32 product d · sc of the super-block's fp16 d and the
  sub-block's integer scale (K-types and `iq4_xs`: one rounding, exactly as ggml's dequantization computes it);
- zero is the fp16 m of `q4_1` / `q5_1`, −(dmin · mn) of `q2_K` / `q4_K` / `q5_K`, and absent for the others.

`fit` chooses the scales by an importance-weighted search (see `GgmlFormat.fit`); `encode` rounds to the nearest
code with the scales fixed, so round-to-nearest, LDLQ and YAQA all apply. `pack` writes each row's blocks in
ggml's byte layout, so the bytes go into a GGUF unchanged; nothing else is stored, and `storage_bits` is exactly
m · n / block_size · type_size · 8. ggml needs whole blocks: a format applies to a layer only where the row length
is a multiple of its block size (256 for the K-types and `iq4_xs`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BitplanError
from .base import Format, GroupParams, QuantizedWeight, check_finite, check_matrix

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # IQ4_NL's levels
FP16_MAX = 65504.0


@dataclass(frozen=True)
class GgmlSpec:
    ggml_type: int          # gguf.GGMLQuantizationType value
    block_size: int         # weights per block (32) or super-block (256)
    type_size: int          # bytes per block
    sub: int                # weights per scale (the sub-block)
    code_bits: int
    lo: int                 # smallest level (linear types); code = level − lo
    hi: int                 # largest level
    has_min: bool           # a zero point per (sub-)block
    nl: bool = False        # levels from IQ4_NL's table
    sc_lo: int = 0          # range of the integer sub-block scale (super-block types)
    sc_hi: int = 0


# ggml type ids and sizes are ggml's (gguf.GGMLQuantizationType, gguf.GGML_QUANT_SIZES)
SPECS: dict[str, GgmlSpec] = {
    "q8_0": GgmlSpec(8, 32, 34, 32, 8, -128, 127, False),
    "q4_0": GgmlSpec(2, 32, 18, 32, 4, -8, 7, False),
    "q4_1": GgmlSpec(3, 32, 20, 32, 4, 0, 15, True),
    "q5_0": GgmlSpec(6, 32, 22, 32, 5, -16, 15, False),
    "q5_1": GgmlSpec(7, 32, 24, 32, 5, 0, 31, True),
    "iq4_nl": GgmlSpec(20, 32, 18, 32, 4, 0, 15, False, nl=True),
    "q2_K": GgmlSpec(10, 256, 84, 16, 2, 0, 3, True, sc_lo=0, sc_hi=15),
    "q3_K": GgmlSpec(11, 256, 110, 16, 3, -4, 3, False, sc_lo=-32, sc_hi=31),
    "q4_K": GgmlSpec(12, 256, 144, 32, 4, 0, 15, True, sc_lo=0, sc_hi=63),
    "q5_K": GgmlSpec(13, 256, 176, 32, 5, 0, 31, True, sc_lo=0, sc_hi=63),
    "q6_K": GgmlSpec(14, 256, 210, 16, 6, -32, 31, False, sc_lo=-128, sc_hi=127),
    "iq4_xs": GgmlSpec(23, 256, 136, 32, 4, 0, 15, False, nl=True, sc_lo=-32, sc_hi=31),
}
GGML_NAMES = tuple(SPECS)

_ROW_CHUNK_WEIGHTS = 1 << 20  # weights per chunk of the scale search (bounds its float64 temporaries)


@dataclass
class GgmlParams(GroupParams):
    """A ggml layer's stored numbers. scale [m, G] / zero [m, G] (float32) are the per-sub-block values the
    dequantization uses, derived from the stored ones: d [m, B] (fp16 values; B blocks per row), dmin [m, B]
    (fp16 values: q4_1/q5_1's m, the K-types' dmin; None without a min), sc / mn [m, G] int64 (the sub-block
    scales and mins of the super-block types; None for the 32-weight types)."""

    d: torch.Tensor | None = None
    dmin: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    mn: torch.Tensor | None = None


def _fp16(x: torch.Tensor, what: str) -> torch.Tensor:
    """Nearest fp16 values (float32 result), BitplanError outside fp16's range."""
    if x.numel() and float(x.abs().max()) > FP16_MAX:
        raise BitplanError(f"a {what} of {float(x.abs().max()):.4g} exceeds the fp16 range (±{FP16_MAX:g}); "
                           "scale the weights down first")
    return x.to(torch.float32).to(torch.float16).to(torch.float32)


@dataclass(frozen=True)
class GgmlFormat(Format):
    ggml_type: int = 0
    block_size: int = 32
    type_size: int = 0

    @classmethod
    def make(cls, name: str, mse_q: float) -> "GgmlFormat":
        s = SPECS[name]
        return cls(name=name, kind="ggml", nominal_bits=s.type_size * 8 / s.block_size, group_size=s.sub,
                   vector_dim=1, code_bits=s.code_bits, mse_q=mse_q, rotated=False, codebook_bits=0,
                   ggml_type=s.ggml_type, block_size=s.block_size, type_size=s.type_size)

    @property
    def spec(self) -> GgmlSpec:
        return SPECS[self.name]

    @property
    def has_zero(self) -> bool:
        return self.spec.has_min

    # -- storage ---------------------------------------------------------------------------------------
    def applicable(self, m: int, n: int) -> bool:
        return m >= 1 and n >= 1 and n % self.block_size == 0

    def _require(self, m: int, n: int) -> None:
        if not self.applicable(m, n):
            raise BitplanError(f"{self.name} needs rows whose length is a multiple of {self.block_size} "
                               f"(ggml's block); a {m}×{n} layer does not fit it, choose a 32-weight type "
                               "such as q4_0 or q8_0")

    def storage_bits(self, m: int, n: int) -> int:
        self._require(m, n)
        return m * (n // self.block_size) * self.type_size * 8

    # -- levels ----------------------------------------------------------------------------------------
    def levels(self) -> torch.Tensor:
        """Level of each code (float64 [2^code_bits])."""
        s = self.spec
        if s.nl:
            return torch.tensor(KVALUES, dtype=torch.float64)
        return torch.arange(s.lo, s.hi + 1, dtype=torch.float64)

    def _nearest(self, q: torch.Tensor) -> torch.Tensor:
        """Code of the level nearest q (q in units of the scale), int64."""
        s = self.spec
        if s.nl:
            lv = self.levels().to(q.device)
            mids = ((lv[1:] + lv[:-1]) / 2).to(q.dtype)
            return torch.bucketize(q, mids)
        return torch.round(q).clamp_(s.lo, s.hi).to(torch.int64) - s.lo

    def _codes(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        t = x if zero is None else x - zero
        q = torch.where(scale == 0, 0.0, t / torch.where(scale == 0, 1.0, scale))
        return self._nearest(q)

    def _rtn_levels(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """Levels (float64) of the nearest codes: `levels()[_codes(...)]` without the integer round trip."""
        s = self.spec
        if s.nl:
            return self.levels()[self._codes(x, scale, zero)]
        t = x if zero is None else x - zero
        q = t / torch.where(scale == 0, 1.0, scale)   # a zero scale decodes every level to 0 (or the zero)
        return torch.round(q).clamp_(s.lo, s.hi)

    # -- Format interface ------------------------------------------------------------------------------
    def encode(self, T: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None = None) -> torch.Tensor:
        if scale is None or tuple(scale.shape) != tuple(T.shape) or (self.has_zero and (
                zero is None or tuple(zero.shape) != tuple(T.shape))):
            raise BitplanError(f"{self.name}: encode needs per-weight scale{' and zero' if self.has_zero else ''} "
                               f"of shape {tuple(T.shape)} (see per_weight)")
        check_finite(T, f"{self.name}: input")
        z = zero.detach().to(torch.float64) if self.has_zero else None
        return self._codes(T.detach().to(torch.float64), scale.detach().to(torch.float64), z).to(torch.int32)

    def decode(self, codes: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None = None) -> torch.Tensor:
        if scale is None or tuple(scale.shape) != tuple(codes.shape):
            raise BitplanError(f"{self.name}: decode needs a per-weight scale of shape {tuple(codes.shape)}")
        level = self.levels().to(torch.float32).to(codes.device)[codes.long()]
        # ggml: (scale · level) then + zero, two float32 roundings; scale is already the float32 d · sc
        out = level * scale.to(torch.float32)
        return out + zero.to(torch.float32) if self.has_zero else out

    def quantize(self, W: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedWeight:
        check_matrix(W)
        m, n = W.shape
        params = self.fit(W, importance)
        scale, zero = self.per_weight(params, n)
        return QuantizedWeight(self.name, (m, n), self.encode(W, scale, zero), params)

    # -- fitting ---------------------------------------------------------------------------------------
    def fit(self, W: torch.Tensor, importance: torch.Tensor | None = None) -> GgmlParams:
        """Scales (and mins) of every block, by a weighted search in the manner of llama.cpp's make_qx_quants /
        make_qkx2_quants / quantize_row_iq4_nl.

        Weights of the search: `importance` [n] (a layer's mean x² per input column, what an imatrix holds)
        when given, else w² + mean(w²) of the block (the weight's own square, floored so near-zero weights
        still count). Per sub-block, a fan of trial scales around the max-based one each rounds the block,
        the least-squares scale (and min) for those codes is solved, and every trial and refit, plus the
        max-based scale itself, is judged by the weighted error of round-to-nearest with that scale stored as
        ggml stores it; the best is kept. Super-block types then quantize the sub-block scales (and mins) to
        integers under a fan of fp16 super-scales d (and dmin), again keeping the one with the least weighted
        error of the whole super-block."""
        check_matrix(W)
        m, n = W.shape
        self._require(m, n)
        imp = None
        if importance is not None:
            imp = torch.as_tensor(importance).detach().to(torch.float64).flatten().cpu()
            if imp.numel() != n or not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
                raise BitplanError(f"{self.name}: importance must be {n} finite non-negative values (one per input "
                                   f"column), got {tuple(importance.shape)}")
        rows = max(1, _ROW_CHUNK_WEIGHTS // n)
        parts = [self._fit_rows(W[r:r + rows].detach().to("cpu", torch.float64), imp) for r in range(0, m, rows)]
        cat = lambda k: None if parts[0][k] is None else torch.cat([p[k] for p in parts])  # noqa: E731
        return self._params(cat("d"), cat("dmin"), cat("sc"), cat("mn"), W.device)

    def _params(self, d, dmin, sc, mn, device=None) -> GgmlParams:
        """GgmlParams with scale / zero derived from the stored numbers in ggml's float32 arithmetic."""
        s = self.spec
        d = d.to(torch.float32)
        dmin = dmin.to(torch.float32) if dmin is not None else None
        if s.block_size == s.sub:
            scale, zero = d, dmin
        else:
            per = s.block_size // s.sub
            scale = torch.repeat_interleave(d, per, dim=1) * sc.to(torch.float32)
            zero = -(torch.repeat_interleave(dmin, per, dim=1) * mn.to(torch.float32)) if s.has_min else None
        p = GgmlParams(scale, zero, d, dmin, sc, mn)
        if device is not None:
            p = GgmlParams(*(t.to(device) if t is not None else None for t in
                             (p.scale, p.zero, p.d, p.dmin, p.sc, p.mn)))
        return p

    def _weights(self, X: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
        """Search weights [r, B, bs] for rows X [r, n]."""
        r, n = X.shape
        bs = self.block_size
        Xb = X.view(r, n // bs, bs)
        if imp is not None:
            w = imp.view(1, n // bs, bs).expand(r, -1, -1).clone()
            dead = w.sum(-1, keepdim=True) == 0     # a block no input reaches: plain MSE there
            return torch.where(dead, 1.0, w)
        x2 = Xb * Xb
        w = x2 + x2.mean(-1, keepdim=True)
        return torch.where(w.sum(-1, keepdim=True) == 0, 1.0, w)

    def _err(self, x, w, scale, zero):
        """Weighted squared error of RTN with the given (sub-block broadcast) scale / zero, summed over the last dim."""
        lv = self._rtn_levels(x, scale, zero)
        v = lv * scale + (zero if zero is not None else 0.0)
        return (w * (x - v).pow(2)).sum(-1)

    def _sub_candidates(self, x: torch.Tensor, w: torch.Tensor):
        """Candidate (scale, zero) pairs for sub-blocks x, w [..., g] (float64, not yet stored): the max-based
        ones, and of a fan of trial scales the least-squares refit with the least weighted error for its codes
        (judged in closed form from the weighted sums, so each trial costs one pass)."""
        s = self.spec
        if not s.has_min:
            amax_i = x.abs().argmax(-1, keepdim=True)
            mx = torch.gather(x, -1, amax_i).squeeze(-1)                    # the signed extreme
            safe = torch.where(mx == 0, 1.0, mx)
            lv = self.levels()
            step = 2.0 if s.nl else 0.1 * max(1.0, (s.hi - s.lo + 1) / 16)   # llama.cpp's 0.1 for ≤ 4 bits
            wx = w * x
            best_f = best_s = None
            bases = []
            for end in (float(lv[0]), float(lv[-1])):
                bases.append(safe / end)
                for t in range(-4, 5):
                    base = safe / (end + t * step)          # the extreme mapped to a level near `end`
                    l = self._rtn_levels(x, base.unsqueeze(-1), None)
                    num, den = (wx * l).sum(-1), (w * l * l).sum(-1)
                    ok = den > 0
                    fom = torch.where(ok, num * num / torch.where(ok, den, 1.0), -1.0)   # error = Σwx² − fom
                    ls = torch.where(ok, num / torch.where(ok, den, 1.0), 0.0)
                    if best_f is None:
                        best_f, best_s = fom, ls
                    else:
                        better = fom > best_f
                        best_f, best_s = torch.where(better, fom, best_f), torch.where(better, ls, best_s)
            cands = [torch.where(mx == 0, 0.0, c) for c in bases + [best_s]]
            return cands, [None] * len(cands)
        lo = x.amin(-1)
        hi = x.amax(-1)
        if s.block_size != s.sub:
            lo = lo.clamp(max=0.0)      # K-types store the min as −dmin·mn with mn ≥ 0
        rng = hi - lo
        safe = torch.where(rng == 0, 1.0, rng)
        nmax = s.hi
        A, D = w.sum(-1), (w * x).sum(-1)
        wx = w * x
        best_f = best_s = best_z = None
        for t in range(0, 21, 2):
            iscale = (nmax - 1.0 + 0.1 * t) / safe
            l = torch.round((x - lo.unsqueeze(-1)) * iscale.unsqueeze(-1)).clamp_(0, nmax)
            wl = w * l
            B, C, E = wl.sum(-1), (wl * l).sum(-1), (wx * l).sum(-1)
            det = A * C - B * B
            ok = det > 1e-12 * (A * C).clamp_min(1e-300)
            sd = torch.where(ok, (A * E - B * D) / torch.where(ok, det, 1.0), rng / nmax)
            zd = torch.where(ok, (C * D - B * E) / torch.where(ok, det, 1.0), lo)
            if s.block_size != s.sub:
                pos = zd > 0
                sd = torch.where(pos, torch.where(C > 0, E / torch.where(C > 0, C, 1.0), 0.0), sd)
                zd = torch.where(pos, 0.0, zd)
                sd = sd.clamp_min(0.0)
            # weighted error for these codes, less the constant Σwx²: −2sE − 2zD + s²C + 2szB + z²A
            f = sd * sd * C + 2 * sd * zd * B + zd * zd * A - 2 * sd * E - 2 * zd * D
            if best_f is None:
                best_f, best_s, best_z = f, sd, zd
            else:
                better = f < best_f
                best_f = torch.where(better, f, best_f)
                best_s, best_z = torch.where(better, sd, best_s), torch.where(better, zd, best_z)
        return [rng / nmax, best_s], [lo, best_z]

    def _best(self, x, w, cands_s, cands_z, store):
        """Per (sub-)block, the candidate whose stored form (`store`) gives the least weighted RTN error."""
        best_e = best_s = best_z = None
        for cs, cz in zip(cands_s, cands_z):
            cs, cz = store(cs, cz)
            e = self._err(x, w, cs.unsqueeze(-1), cz.unsqueeze(-1) if cz is not None else None)
            if best_e is None:
                best_e, best_s, best_z = e, cs, cz
                continue
            better = e < best_e
            best_e = torch.where(better, e, best_e)
            best_s = torch.where(better, cs, best_s)
            best_z = torch.where(better, cz, best_z) if cz is not None else None
        return best_s, best_z

    def _fit_rows(self, X: torch.Tensor, imp: torch.Tensor | None) -> dict:
        s = self.spec
        r, n = X.shape
        B, bs, g = n // s.block_size, s.block_size, s.sub
        w = self._weights(X, imp)
        if bs == g:                       # 32-weight types: d (and m) are fp16 directly
            x = X.view(r, B, bs)
            cs, cz = self._sub_candidates(x, w)
            store = lambda a, b: (_fp16(a, f"{self.name} scale").double(),  # noqa: E731
                                  _fp16(b, f"{self.name} min").double() if b is not None else None)
            d, m = self._best(x, w, cs, cz, store)
            return {"d": d, "dmin": m, "sc": None, "mn": None}
        per = bs // g
        xs, ws = X.view(r, B, per, g), w.view(r, B, per, g)
        cs, cz = self._sub_candidates(xs, ws)
        sub_s, sub_z = self._best(xs, ws, cs, cz, lambda a, b: (a, b))      # float sub-block scales (mins)
        # the super-block: integer sub-scales under a fan of fp16 d (and dmin)
        x, wb = X.view(r, B, per, g), w.view(r, B, per, g)
        best = None
        for k in (0.0, -0.5, 0.5, 1.0, 2.0, 4.0):
            d, sc = self._quantize_scales(sub_s, k, signed=not s.has_min)
            if s.has_min:
                dmin, mn = self._quantize_scales(-sub_z, k, signed=False)
                zero = -(dmin.unsqueeze(-1).float() * mn.float()).double()
            else:
                dmin = mn = zero = None
            scale = (d.unsqueeze(-1).float() * sc.float()).double()
            e = self._err(x, wb, scale.unsqueeze(-1), zero.unsqueeze(-1) if zero is not None else None).sum(-1)
            if best is None:
                best = [e, d, dmin, sc, mn]
                continue
            better = e < best[0]
            best[0] = torch.where(better, e, best[0])
            best[1] = torch.where(better, d, best[1])
            best[3] = torch.where(better.unsqueeze(-1), sc, best[3])
            if s.has_min:
                best[2] = torch.where(better, dmin, best[2])
                best[4] = torch.where(better.unsqueeze(-1), mn, best[4])
        _, d, dmin, sc, mn = best
        # then each sub-block's integer scale (and min) one step either way, where that lowers its weighted error
        zero_of = lambda mn_: -(dmin.unsqueeze(-1).float() * mn_.float()).double().unsqueeze(-1)  # noqa: E731
        scale_of = lambda sc_: (d.unsqueeze(-1).float() * sc_.float()).double().unsqueeze(-1)     # noqa: E731
        cur = self._err(x, wb, scale_of(sc), zero_of(mn) if s.has_min else None)
        for which in (("sc", "mn") if s.has_min else ("sc",)):
            lo, hi = (s.sc_lo, s.sc_hi) if which == "sc" else (0, s.sc_hi)
            for step in (-1, 1):
                sc_t = (sc + step).clamp(lo, hi) if which == "sc" else sc
                mn_t = (mn + step).clamp(lo, hi) if which == "mn" else mn
                e = self._err(x, wb, scale_of(sc_t), zero_of(mn_t) if s.has_min else None)
                better = e < cur
                cur = torch.where(better, e, cur)
                sc = torch.where(better, sc_t, sc)
                if s.has_min:
                    mn = torch.where(better, mn_t, mn)
        return {"d": d, "dmin": dmin, "sc": sc.reshape(r, B * per), "mn": mn.reshape(r, B * per) if mn is not None else None}

    def _quantize_scales(self, v: torch.Tensor, k: float, signed: bool):
        """fp16 super-scale d [r, B] and integer sub-scales [r, B, per] for the float sub-scales v, with the extreme
        mapped to the integer range's end (widened by k)."""
        s = self.spec
        if signed:
            i = v.abs().argmax(-1, keepdim=True)
            mx = torch.gather(v, -1, i).squeeze(-1)
            d = mx / (s.sc_lo - k)               # the extreme to the most negative integer (the longer side)
            lo, hi = s.sc_lo, s.sc_hi
        else:
            d = v.amax(-1).clamp_min(0.0) / (s.sc_hi + k)
            lo, hi = 0, s.sc_hi
        d = _fp16(d, f"{self.name} super-block scale").double()
        q = torch.where(d.unsqueeze(-1) == 0, 0.0, v / torch.where(d == 0, 1.0, d).unsqueeze(-1))
        return d, torch.round(q).clamp_(lo, hi).to(torch.int64)

    # -- packing ---------------------------------------------------------------------------------------
    def pack(self, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        """{"blocks": uint8 [m, n / block_size · type_size]}: each row's blocks in ggml's byte layout."""
        self._check_qw(qw)
        m, n = qw.shape
        self._require(m, n)
        p = qw.params
        if not isinstance(p, GgmlParams) or p.d is None:
            raise BitplanError(f"{self.name}: pack needs the GgmlParams that fit returned")
        from .ggml_blocks import pack_blocks
        B = n // self.block_size
        codes = qw.codes.detach().cpu().numpy().astype(np.int64).reshape(m * B, self.block_size)
        arr = lambda t: None if t is None else t.detach().cpu().numpy()  # noqa: E731
        raw = pack_blocks(self.name, codes, arr(p.d).reshape(-1), arr(p.dmin).reshape(-1) if p.dmin is not None else None,
                          arr(p.sc).reshape(m * B, -1) if p.sc is not None else None,
                          arr(p.mn).reshape(m * B, -1) if p.mn is not None else None)
        return {"blocks": torch.from_numpy(raw.reshape(m, B * self.type_size).copy())}

    def unpack(self, tensors: dict[str, torch.Tensor], m: int, n: int) -> QuantizedWeight:
        self._require(m, n)
        B = n // self.block_size
        t = tensors.get("blocks")
        if set(tensors) != {"blocks"} or t is None or t.dtype != torch.uint8 or tuple(t.shape) != (m, B * self.type_size):
            got = {k: (str(v.dtype), tuple(v.shape)) for k, v in tensors.items()}
            raise BitplanError(f"{self.name}: a packed {m}×{n} layer is one uint8 tensor 'blocks' of shape "
                               f"[{m}, {B * self.type_size}], got {got}")
        from .ggml_blocks import unpack_blocks
        codes, d, dmin, sc, mn = unpack_blocks(self.name, t.detach().cpu().numpy().reshape(m * B, self.type_size))
        tt = lambda a, shape: None if a is None else torch.from_numpy(np.ascontiguousarray(a)).reshape(shape)  # noqa: E731
        G = n // self.group_size
        params = self._params(tt(d, (m, B)), tt(dmin, (m, B)),
                              tt(sc, (m, G)).long() if sc is not None else None,
                              tt(mn, (m, G)).long() if mn is not None else None)
        return QuantizedWeight(self.name, (m, n), tt(codes, (m, n)).to(torch.int32), params)
