"""The multiple-choice knapsack both solvers work on, with no knowledge of layers or formats.

Each item (a layer, or a tie group of layers merged into one item) picks exactly one of its options; option j of
item k stores `bits[k][j]` (an exact integer) and costs `cost[k][j]`. Minimize the total cost subject to the total
bits (plus, optionally, the codebooks of the grids used) staying within `budget`, and optionally a second linear
resource within its own limit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import BitplanError

_EXACT_GRIDS = 12   # `Problem.fewest_bits` tries every set of at most this many grids with tables


def table_free(G: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """Which options of the padded codebook ids `G` pay no table: no grid, or a grid whose table is 0 bits."""
    if cb.size == 0:
        return np.ones(G.shape, dtype=bool)
    return (G < 0) | (cb[np.maximum(G, 0)] == 0)


def charged_grids(G: np.ndarray, cb: np.ndarray) -> list[int]:
    """The grids whose table costs bits and that some option uses."""
    return [g for g in range(cb.size) if cb[g] > 0 and np.any(G == g)]


@dataclass
class Problem:
    bits: list[np.ndarray]                 # per item: int64 exact storage bits of each option
    cost: list[np.ndarray]                 # per item: float64 cost (predicted ΔKL) of each option
    budget: int                            # bits available to items and codebooks together
    codebook: list[np.ndarray] | None = None   # per item: codebook id of each option, -1 for none
    codebook_bits: np.ndarray | None = None    # bits of each codebook id, paid once if any option uses it
    resource: list[np.ndarray] | None = None   # per item: amount of a second resource each option uses
    resource_limit: float | None = None

    def __post_init__(self) -> None:
        self.bits = [np.asarray(b, dtype=np.int64).ravel() for b in self.bits]
        self.cost = [np.asarray(c, dtype=np.float64).ravel() for c in self.cost]
        if len(self.bits) != len(self.cost) or not self.bits:
            raise BitplanError("a knapsack needs at least one item and as many cost arrays as bit arrays")
        for b, c in zip(self.bits, self.cost):
            if b.size == 0 or b.size != c.size:
                raise BitplanError("every item needs at least one option, with one cost per option")
            if b.min() < 0 or not np.all(np.isfinite(c)):
                raise BitplanError("option bits must be non-negative and costs finite")
        if self.codebook is not None:
            self.codebook = [np.asarray(g, dtype=np.int64).ravel() for g in self.codebook]
            self.codebook_bits = np.asarray(self.codebook_bits, dtype=np.int64).ravel()
        if self.resource is not None:
            self.resource = [np.asarray(r, dtype=np.float64).ravel() for r in self.resource]
            if self.resource_limit is None:
                raise BitplanError("a second resource needs a limit")

    @property
    def n_items(self) -> int:
        return len(self.bits)

    def padded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bits, cost, codebook) as items × options arrays; padding repeats the item's largest bits at cost +inf."""
        n = np.array([b.size for b in self.bits])
        rows = np.repeat(np.arange(n.size), n)
        cols = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        B = np.repeat(np.array([b.max() for b in self.bits], dtype=np.int64)[:, None], n.max(), axis=1)
        C = np.full(B.shape, np.inf)
        G = np.full(B.shape, -1, dtype=np.int64)
        B[rows, cols] = np.concatenate(self.bits)
        C[rows, cols] = np.concatenate(self.cost)
        if self.codebook is not None:
            G[rows, cols] = np.concatenate(self.codebook)
        return B, C, G

    def codebooks_used(self, choice: np.ndarray) -> set[int]:
        if self.codebook is None:
            return set()
        ids = {int(g[j]) for g, j in zip(self.codebook, choice)}
        ids.discard(-1)
        return ids

    def codebook_total(self, choice: np.ndarray) -> int:
        return int(sum(int(self.codebook_bits[g]) for g in self.codebooks_used(choice)))

    def evaluate(self, choice: np.ndarray) -> tuple[float, int]:
        """(cost, storage bits including codebooks) of an assignment."""
        cost = float(np.sum([c[j] for c, j in zip(self.cost, choice)], dtype=np.float64))
        bits = int(np.sum([b[j] for b, j in zip(self.bits, choice)], dtype=np.int64)) + self.codebook_total(choice)
        return cost, bits

    def resource_used(self, choice: np.ndarray) -> float:
        if self.resource is None:
            return 0.0
        return float(np.sum([r[j] for r, j in zip(self.resource, choice)], dtype=np.float64))

    def extreme(self, largest: bool) -> np.ndarray:
        """The assignment with the fewest (or most) bits per item; ties go to the cheaper option."""
        B, C, _ = self.padded()  # padding has the largest bits at cost +inf: never first in either order
        return np.lexsort((C, -B if largest else B), axis=1)[:, 0]

    def fewest_bits(self) -> np.ndarray:
        """The assignment with the fewest storage bits, codebooks included.

        Each item's fewest-bits option can cost more in tables than it saves: a slightly larger option on a grid
        already paid for, or on none, may store less in all. Which grids to pay for is then a small
        facility-location problem: solved exactly by trying every set when at most `_EXACT_GRIDS` grids carry a
        table, else by a local search from the fewest-bits options' grids (add or drop one grid at a time)."""
        if self.codebook is None or not np.any(self.codebook_bits > 0):
            return self.extreme(False)
        B, C, G = self.padded()
        cb = self.codebook_bits
        charged = charged_grids(G, cb)
        free = table_free(G, cb)
        rows = np.arange(B.shape[0])

        def fewest(allowed: frozenset[int]) -> tuple[int, np.ndarray] | None:
            ok = (free | np.isin(G, list(allowed))) & np.isfinite(C)
            if not ok.any(axis=1).all():
                return None
            choice = np.lexsort((C, np.where(ok, B, np.iinfo(np.int64).max)), axis=1)[:, 0]
            return int(B[rows, choice].sum()) + self.codebook_total(choice), choice

        candidates: list[tuple[int, np.ndarray]] = []
        if len(charged) <= _EXACT_GRIDS:
            sets = (frozenset(g for i, g in enumerate(charged) if mask >> i & 1) for mask in range(1 << len(charged)))
            candidates = [r for r in map(fewest, sets) if r is not None]
        else:
            current = frozenset(self.codebooks_used(self.extreme(False)))
            best = fewest(current)
            while True:
                moves = [r for r in (fewest(current ^ {g}) for g in charged) if r is not None and r[0] < best[0]]
                if not moves:
                    break
                best = min(moves, key=lambda r: r[0])
                current = frozenset(self.codebooks_used(best[1]))
            candidates = [best]
        return min(candidates, key=lambda r: r[0])[1]

    def bit_range(self) -> tuple[int, int]:
        """Storage bits of the fewest-bits and the most-bits assignments, codebooks included."""
        return self.evaluate(self.fewest_bits())[1], self.evaluate(self.extreme(True))[1]


@dataclass
class Solution:
    choice: np.ndarray          # option index per item
    cost: float                 # Σ cost, float64
    bits: int                   # exact storage bits, codebooks included
    optimal: bool               # proven optimal for the problem the solver saw (see `note`)
    stats: dict = field(default_factory=dict)


def pareto(cells: np.ndarray, cost: np.ndarray, tiebreak: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of items × options arrays, the options no other option of the row beats.

    Sorted by cells, each kept option is strictly cheaper than every option with fewer or equal cells; dropping
    the rest never changes the optimum (a dominated option can always be swapped for its dominator). `tiebreak`
    orders options of equal cells and cost (the exact bits, when cells are rounded). Returns the kept options
    packed to the left as (cells, cost, original column), padded with the row's last kept cells at cost +inf.
    """
    order = np.lexsort((tiebreak, cost, cells), axis=1)
    cs = np.take_along_axis(cells, order, axis=1)
    cc = np.take_along_axis(cost, order, axis=1)
    running = np.minimum.accumulate(cc, axis=1)
    keep = np.isfinite(cc)
    keep[:, 1:] &= cc[:, 1:] < running[:, :-1]
    count = keep.sum(axis=1)
    pos = np.cumsum(keep, axis=1) - 1
    r, c = np.nonzero(keep)
    width = int(count.max())
    rows = np.arange(cells.shape[0])
    out_cells = np.empty((cells.shape[0], width), dtype=np.int64)
    out_cells[:] = cs[rows, np.argmax(np.where(keep, pos, -1), axis=1)][:, None]
    out_cost = np.full((cells.shape[0], width), np.inf)
    out_col = np.zeros((cells.shape[0], width), dtype=np.int64)
    out_cells[r, pos[r, c]] = cs[r, c]
    out_cost[r, pos[r, c]] = cc[r, c]
    out_col[r, pos[r, c]] = order[r, c]
    return out_cells, out_cost, out_col
