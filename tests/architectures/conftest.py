"""One torch thread for the tier: tiny models gain nothing from more, and on a busy machine several threads
spin-wait on each other (a family's profile took 20 s with two threads beside other jobs, 1.5 s with one)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
