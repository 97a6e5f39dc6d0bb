"""Randomized Hadamard transforms: orthonormal rotations R = H·S for incoherence processing.

`S` is a diagonal of seeded random ±1 signs and `H` is a normalized Hadamard matrix of order n, built as

- **Sylvester** `Had_{2^k}` when n is a power of two;
- **Kronecker** `Had_K ⊗ Had_{2^k}` when n = K·2^k and a Hadamard matrix of order K comes from a Paley
  construction over a finite field GF(q), q a prime power: Paley I gives K = q + 1 for q ≡ 3 (mod 4),
  Paley II gives K = 2(q + 1) for q ≡ 1 (mod 4). The smallest such K is used (the K-part costs K
  multiply-adds per entry, the 2^k-part one small dense matmul per tile of ≤ FWHT_TILE, see `fwht`);
- **block-diagonal** Sylvester blocks of size 2^k (the largest power of two dividing n) otherwise, if
  2^k ≥ MIN_BLOCK. Mixing then stays inside each block; other n are unsupported.

The dimensions met in common LLMs get:

    n                       construction
    2^k                     Sylvester Had_{2^k}
    192   = 12 · 16         Had_12 (Paley I, q = 11)       ⊗ Had_16
    576   = 36 · 16         Had_36 (Paley II, q = 17)      ⊗ Had_16
    640   = 20 · 32         Had_20 (Paley I, q = 19)       ⊗ Had_32
    1536  = 12 · 128        Had_12 (Paley I, q = 11)       ⊗ Had_128
    2560  = 20 · 128        Had_20 (Paley I, q = 19)       ⊗ Had_128
    3072  = 12 · 256        Had_12 (Paley I, q = 11)       ⊗ Had_256
    11008 = 344 · 32        Had_344 (Paley I, q = 7^3)     ⊗ Had_32    (172 = 4·43 has no Paley construction)
    14336 = 28 · 512        Had_28 (Paley I, q = 3^3)      ⊗ Had_512
    28672 = 28 · 1024       Had_28 (Paley I, q = 3^3)      ⊗ Had_1024

`describe(n)` prints the construction of any n. Applying R to a length-n vector, n = K·2^k, costs
O(n (K + FWHT_TILE · ⌈k / 5⌉));
no dense n×n matrix is formed (`matrix()` exists for tests).

Weights and the linear-layer identity. For a linear layer y = x Wᵀ with W ∈ R^{m×n} (out × in),
`rotate_weight` returns W_rot = R_m W R_nᵀ. Since R is orthogonal, W = R_mᵀ W_rot R_n and

    y = x Wᵀ = (x R_nᵀ) W_rotᵀ R_m ,   i.e.  y = R_m.inverse( R_n.forward(x) @ W_rotᵀ )

with both transforms applied along the last dim (each row vector v ↦ H S v, resp. v ↦ S Hᵀ v).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import BitplanError

# Smallest power-of-two block accepted by the block-diagonal fallback: below it the rotation mixes so few
# entries that rotated weights are far from Gaussian, and the Gaussian-grid error model no longer holds.
MIN_BLOCK = 32
# Largest Paley order tried; the K×K part costs K multiply-adds per entry.
MAX_PALEY_ORDER = 2048

SUPPORTED_FORMS = (
    "a power of two; K·2^k with a Paley Hadamard matrix of order K (K = q+1, q ≡ 3 mod 4, or K = 2(q+1), "
    f"q ≡ 1 mod 4, q a prime power); or any n whose largest power-of-two divisor is ≥ {MIN_BLOCK} "
    "(block-diagonal)"
)


# ----------------------------------------------------------------------------------------------------------
# Finite fields and Paley matrices
# ----------------------------------------------------------------------------------------------------------

def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, p prime, or None."""
    if q < 2:
        return None
    for p in range(2, math.isqrt(q) + 1):
        if q % p == 0:
            k = 0
            while q % p == 0:
                q //= p
                k += 1
            return (p, k) if q == 1 else None
    return q, 1


def _polymod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); coefficient lists, lowest degree first, f monic."""
    a = [c % p for c in a]
    d = len(f) - 1
    for i in range(len(a) - 1, d - 1, -1):
        c = a[i]
        if c:
            for j in range(d + 1):
                a[i - d + j] = (a[i - d + j] - c * f[j]) % p
    return a[:d]


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree k over GF(p) (trial division by all lower degrees)."""
    if k == 1:
        return [0, 1]

    def polys(deg: int):
        for idx in range(p**deg):
            coeffs = [(idx // p**i) % p for i in range(deg)]
            yield coeffs + [1]

    for f in polys(k):
        if f[0] == 0:
            continue
        if all(any(_polymod(f, g, p)) for d in range(1, k // 2 + 1) for g in polys(d)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def _quadratic_character(q: int) -> tuple[np.ndarray, np.ndarray]:
    """(chi, sub): chi[a] ∈ {0, ±1} the quadratic character of GF(q), sub[a, b] = index of a − b.

    Elements are integers 0..q−1 whose base-p digits are polynomial coefficients modulo an irreducible
    polynomial, so prime powers (e.g. 343 = 7^3) work as well as primes."""
    p, k = _prime_power(q)
    digits = np.array([[(a // p**i) % p for i in range(k)] for a in range(q)], dtype=np.int64)
    weights = p ** np.arange(k, dtype=np.int64)
    sub = ((digits[:, None, :] - digits[None, :, :]) % p) @ weights
    f = _irreducible(p, k)
    squares = set()
    for a in range(1, q):
        sq = [0] * (2 * k - 1)
        da = digits[a]
        for i in range(k):
            for j in range(k):
                sq[i + j] += int(da[i]) * int(da[j])
        r = _polymod(sq, f, p) if k > 1 else [sq[0] % p]
        squares.add(int(sum(c * p**i for i, c in enumerate(r))))
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=np.int64)
    return chi, sub


def _paley_order(K: int) -> tuple[str, int] | None:
    """("I", q) or ("II", q) if a Paley construction gives a Hadamard matrix of order K, else None."""
    if K > MAX_PALEY_ORDER or K % 4:
        return None
    q = K - 1
    if _prime_power(q) and q % 4 == 3:
        return "I", q
    q = K // 2 - 1
    if _prime_power(q) and q % 4 == 1:
        return "II", q
    return None


@functools.lru_cache(maxsize=None)
def _paley_np(K: int) -> np.ndarray:
    kind, q = _paley_order(K)
    chi, sub = _quadratic_character(q)
    Q = chi[sub]  # Jacobsthal matrix, Q[a, b] = chi(a − b)
    ones = np.ones(q, dtype=np.int64)
    if kind == "I":  # q ≡ 3 mod 4: Q skew-symmetric, H = I + [[0, 1ᵀ], [−1, Q]]
        S = np.zeros((q + 1, q + 1), dtype=np.int64)
        S[0, 1:] = ones
        S[1:, 0] = -ones
        S[1:, 1:] = Q
        H = np.eye(q + 1, dtype=np.int64) + S
    else:  # q ≡ 1 mod 4: symmetric conference matrix C, H = C ⊗ [[1,1],[1,−1]] + I ⊗ [[1,−1],[−1,−1]]
        C = np.zeros((q + 1, q + 1), dtype=np.int64)
        C[0, 1:] = ones
        C[1:, 0] = ones
        C[1:, 1:] = Q
        H = np.kron(C, np.array([[1, 1], [1, -1]])) + np.kron(np.eye(q + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]]))
    if not np.array_equal(H @ H.T, K * np.eye(K, dtype=np.int64)):  # the construction is the proof; check anyway
        raise AssertionError(f"Paley construction of order {K} is not Hadamard")
    H.setflags(write=False)
    return H


def hadamard_matrix(K: int) -> torch.Tensor:
    """An unnormalized ±1 Hadamard matrix of order K: Sylvester for powers of two, else Paley (float64)."""
    if K >= 1 and K & (K - 1) == 0:
        return sylvester(K)
    if _paley_order(K) is None:
        raise BitplanError(f"no Hadamard matrix of order {K} is constructible here "
                           "(supported: powers of two and Paley orders)")
    return torch.from_numpy(_paley_np(K).astype(np.float64))


def sylvester(N: int) -> torch.Tensor:
    """Dense unnormalized Sylvester Hadamard matrix of order N (a power of two), float64; for tests and small N."""
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < N:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


# ----------------------------------------------------------------------------------------------------------
# Plans: which construction a dimension gets
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HadamardPlan:
    n: int
    kind: str  # "sylvester", "kronecker" or "block"
    K: int  # order of the dense factor (1 for sylvester and block)
    block: int  # the power-of-two part: FWHT length

    def describe(self) -> str:
        if self.kind == "sylvester":
            return f"Sylvester Had_{self.n}"
        if self.kind == "kronecker":
            paley, q = _paley_order(self.K)
            pk = _prime_power(q)
            qs = f"{pk[0]}^{pk[1]}" if pk[1] > 1 else str(q)
            return f"Had_{self.K} (Paley {paley}, q = {qs}) ⊗ Had_{self.block}"
        return f"block-diagonal, {self.n // self.block} blocks of Had_{self.block}"


@functools.lru_cache(maxsize=None)
def plan(n: int) -> HadamardPlan | None:
    if not isinstance(n, int) or n < 1:
        return None
    two = n & -n  # largest power of two dividing n
    odd = n // two
    if odd == 1:
        return HadamardPlan(n, "sylvester", 1, n)
    K, block = odd * 4, two // 4
    while block >= 1:
        if _paley_order(K) is not None:
            return HadamardPlan(n, "kronecker", K, block)
        K, block = K * 2, block // 2
    if two >= MIN_BLOCK:
        return HadamardPlan(n, "block", 1, two)
    return None


def is_supported(n: int) -> bool:
    return plan(n) is not None


def describe(n: int) -> str:
    p = plan(n)
    if p is None:
        raise BitplanError(f"no randomized Hadamard transform for dimension {n}; supported: {SUPPORTED_FORMS}")
    return p.describe()


# ----------------------------------------------------------------------------------------------------------
# The transform
# ----------------------------------------------------------------------------------------------------------

# The Sylvester transform is applied as dense Had_f matmuls over tiles of f ≤ FWHT_TILE entries: Had_{2^k} is the
# Kronecker product of the tiles' Sylvester matrices, so each tile axis is one small matmul. BLAS runs those at
# 5–15× the speed of log2(N) butterfly passes, each of which streams the whole tensor through memory
# (`python benchmarks/hadamard_bench.py`); the cost per entry stays O(f · passes), not O(N).
FWHT_TILE = 32


@functools.lru_cache(maxsize=None)
def _sylvester_tile(f: int, dtype: torch.dtype) -> torch.Tensor:
    return sylvester(f).to(dtype)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh–Hadamard transform (Sylvester order) along the last dim, a power of two N:
    x·Had_N, as one matmul per tile axis of N = f_1·f_2·… (f_i ≤ FWHT_TILE, the first the most significant)."""
    N = x.shape[-1]
    if N & (N - 1):
        raise BitplanError(f"fwht needs a power-of-two length, got {N}")
    lead, rows = x.shape[:-1], x.numel() // max(N, 1)
    y, before = x.reshape(rows, N).contiguous(), 1   # strided views (a transposed factor) make BLAS crawl
    while before < N:
        f = min(FWHT_TILE, N // before)
        after = N // (before * f)
        Hf = _sylvester_tile(f, x.dtype).to(x.device)   # symmetric, so applying it on either side is the same
        y = y.reshape(-1, f) @ Hf if after == 1 else torch.matmul(Hf, y.reshape(rows * before, f, after))
        before *= f
    return y.reshape(*lead, N)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise BitplanError(f"rotation seed must be an integer in [0, 2^64), got {seed!r}")
    return int(seed)


@dataclass(frozen=True, eq=False)
class RandomizedHadamard:
    """R = H·S for dimension n: seeded ±1 signs S, then the normalized Hadamard transform H (orthonormal)."""

    n: int
    seed: int
    plan: HadamardPlan = field(init=False, repr=False)
    signs: torch.Tensor = field(init=False, repr=False)  # float64 ±1, shape [n]
    _dense_k: torch.Tensor | None = field(init=False, repr=False)  # Had_K (unnormalized) for kronecker plans

    def __post_init__(self) -> None:
        p = plan(self.n)
        if p is None:
            raise BitplanError(f"no randomized Hadamard transform for dimension {self.n}; supported: {SUPPORTED_FORMS}")
        seed = _check_seed(self.seed)
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (self.n,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1
        object.__setattr__(self, "plan", p)
        object.__setattr__(self, "signs", signs)
        object.__setattr__(self, "_dense_k", hadamard_matrix(p.K) if p.kind == "kronecker" else None)

    # -- core on [B, n] -----------------------------------------------------------------------------------
    def _apply(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        p = self.plan
        B = x.shape[0]
        if p.kind == "kronecker":
            y = fwht(x.reshape(B, p.K, p.block))  # Sylvester part is symmetric
            Hk = self._dense_k.to(x.device, x.dtype)
            y = torch.matmul(Hk.T if transpose else Hk, y)
        else:
            y = fwht(x.reshape(B, self.n // p.block, p.block))
        return y.reshape(B, self.n) * (1.0 / math.sqrt(p.K * p.block))

    def _along(self, x: torch.Tensor, dim: int, inverse: bool) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise BitplanError("RandomizedHadamard expects a torch.Tensor")
        if x.dim() == 0:
            raise BitplanError("cannot rotate a 0-dimensional tensor")
        dim = dim % x.dim()
        if x.shape[dim] != self.n:
            raise BitplanError(f"rotation of size {self.n} applied to a dimension of size {x.shape[dim]} "
                               f"(shape {tuple(x.shape)}, dim {dim})")
        out_dtype = x.dtype
        work = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        moved = work.movedim(dim, -1)
        shape = moved.shape
        flat = moved.reshape(-1, self.n)
        signs = self.signs.to(flat.device, flat.dtype)
        if inverse:  # (H S)^-1 = S Hᵀ
            flat = self._apply(flat, transpose=True) * signs
        else:
            flat = self._apply(flat * signs, transpose=False)
        return flat.reshape(shape).movedim(-1, dim).to(out_dtype)

    def forward(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Each length-n vector v along `dim` becomes H S v (for dim=-1: x ↦ x (H S)ᵀ)."""
        return self._along(x, dim, inverse=False)

    __call__ = forward

    def inverse(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Each length-n vector v along `dim` becomes S Hᵀ v = (H S)ᵀ v."""
        return self._along(x, dim, inverse=True)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense R = H S built from the factors (Kronecker product / block diagonal); for tests, O(n²) memory."""
        p = self.plan
        if p.kind == "kronecker":
            H = torch.kron(self._dense_k, sylvester(p.block))
        elif p.kind == "block":
            H = torch.block_diag(*[sylvester(p.block)] * (self.n // p.block))
        else:
            H = sylvester(self.n)
        return (H / math.sqrt(p.K * p.block) * self.signs).to(dtype)


def rotate_weight(W: torch.Tensor, seed_out: int, seed_in: int) -> torch.Tensor:
    """W_rot = R_m W R_nᵀ for W of shape [m, n] (out × in); R_m from seed_out, R_n from seed_in."""
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise BitplanError(f"rotate_weight expects a 2-D weight tensor, got {getattr(W, 'shape', type(W))}")
    m, n = W.shape
    return rotate_in_place(W.clone(), RandomizedHadamard(m, seed_out), RandomizedHadamard(n, seed_in))


def rotate_in_place(X: torch.Tensor, had_out: RandomizedHadamard, had_in: RandomizedHadamard,
                    inverse: bool = False, block_bytes: int = 16 * 2 ** 20) -> torch.Tensor:
    """X ← R_m X R_nᵀ (inverse: R_mᵀ X R_n), along dim 0 a block of columns at a time, then along dim 1 a block
    of rows at a time. Each vector is transformed alone, so the values are those of whole-matrix passes, without
    their temporaries (several copies of X: 2 GiB for an 8192² float64 factor)."""
    m, n = X.shape
    step = max(1, block_bytes // (X.element_size() * max(m, n)))
    for c in range(0, n, step):
        X[:, c:c + step] = had_out._along(X[:, c:c + step], 0, inverse)
    for r in range(0, m, step):
        X[r:r + step] = had_in._along(X[r:r + step], 1, inverse)
    return X


def unrotate_weight(W_rot: torch.Tensor, seed_out: int, seed_in: int) -> torch.Tensor:
    """W = R_mᵀ W_rot R_n, the inverse of rotate_weight."""
    if not isinstance(W_rot, torch.Tensor) or W_rot.dim() != 2:
        raise BitplanError(f"unrotate_weight expects a 2-D weight tensor, got {getattr(W_rot, 'shape', type(W_rot))}")
    m, n = W_rot.shape
    return rotate_in_place(W_rot.clone(), RandomizedHadamard(m, seed_out), RandomizedHadamard(n, seed_in),
                           inverse=True)