"""Fixtures for the profile tests."""
from __future__ import annotations

import pytest
import torch

from tests.profile.helpers import tiny_llama


@pytest.fixture
def tiny64():
    """A float64 tiny model: float64 end to end, so sketches can be compared to brute force at 1e-10."""
    return tiny_llama(dtype=torch.float64)


@pytest.fixture
def tiny32():
    return tiny_llama(dtype=torch.float32)
