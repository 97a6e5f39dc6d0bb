"""Kernel tests run on the GPU when there is one, else on CPU tensors through Triton's interpreter.

TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before any `kernels` module is imported.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if importlib.util.find_spec("triton") is None:  # triton is a dev dependency; without it there is nothing to test
    collect_ignore_glob = ["*.py"]


@pytest.fixture(scope="session")
def device() -> torch.device:
    from bitplan.kernels.dequant import INTERPRETED

    if INTERPRETED:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("no GPU, and TRITON_INTERPRET=1 is not set: the Triton kernels cannot run here")
