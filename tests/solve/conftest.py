from __future__ import annotations

import pytest

from bitplan.solve.synthetic import synthetic_profile

SMALL_SHAPES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "gate_proj": (96, 64)}
INT_FORMATS = ["int2-g64", "int3-g64", "int4-g64", "int8-g64", "fp16"]
GRID_FORMATS = ["higgs-p2-n16-g64", "higgs-p2-n64-g64", "higgs-p1-n16-g64", "int3-g64", "fp16"]


@pytest.fixture
def small_profile():
    """2 blocks × 4 projections, integer formats only (no codebooks: the DP is exact on it)."""
    from bitplan.formats import get_format

    return synthetic_profile(blocks=2, shapes=SMALL_SHAPES, formats=[get_format(f) for f in INT_FORMATS],
                             seed=1, vocab=100, hidden=64)


@pytest.fixture
def grid_profile():
    from bitplan.formats import get_format

    return synthetic_profile(blocks=2, shapes=SMALL_SHAPES, formats=[get_format(f) for f in GRID_FORMATS],
                             seed=2, vocab=100, hidden=64, measured=0.7)
