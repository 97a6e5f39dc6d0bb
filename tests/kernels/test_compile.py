"""Every kernel family lowers to cubin for Hopper (sm_90) and Ampere (sm_80), checked without a GPU: the
interpreter runs the kernels' arithmetic but not the GPU compiler's rules (tl.dot shapes and dtypes, casts,
layouts), nor the bit-packing LLVM crashes seen on Ampere (triton #4906)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's CUDA backend (ptxas) is not installed")
def test_kernels_compile_for_nvidia_gpus():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-m", "tests.kernels.aot_compile", "90", "80"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert run.stdout.count("ok   sm_") >= 30
