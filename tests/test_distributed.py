"""torchrun with 2 CPU processes (gloo) reproduces the single-process profile and checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bitplan.apply import apply_plan
from bitplan.distributed import Ranks
from bitplan.models import find_linears, load_model
from bitplan.profile import load_factors, load_profile, profile_model
from bitplan.solve import solve

FORMATS = "int4-g32,int3-g64,fp16"
PROFILE_ARGS = dict(samples=10, seqlen=16, sketch_chunk=4, noise_samples=2, formats=FORMATS, batch_size=2,
                    checkpoint_every=2, factor_groups=2, judge_samples=2)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m bitplan ARGS` (a free port, one thread per process)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "bitplan", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def cli_args(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def assert_close(a, b, path="", rel=1e-6):
    """Equal structure; numbers equal within `rel` (float64 sums in another order)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}", rel)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]", rel)
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert b == pytest.approx(a, rel=rel, abs=1e-12), path
    else:
        assert a == b, path


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def test_ranks_deal_items_round_robin():
    ranks = [Ranks(r, 3) for r in range(3)]
    items = list(range(10))
    shares = [r.share(items) for r in ranks]
    assert sorted(sum(shares, [])) == items and shares[1] == [1, 4, 7]
    assert all(ranks[0].owner(i) == i % 3 for i in items) and Ranks().share(items) == items


def test_two_processes_equal_one(tmp_path, tiny_model_dir, tiny_text):
    # 10 windows: halves of 5, batches of 2, 1 → rank 1 runs a stand-in third batch that sends zeros; the layers
    # in two groups (each half runs the calibration twice).
    single = tmp_path / "single"
    ref = profile_model(str(tiny_model_dir), str(tiny_text), out_dir=single, progress=False, **PROFILE_ARGS)

    two = tmp_path / "two"
    run = torchrun("profile", str(tiny_model_dir), "--calib", str(tiny_text), "--out", str(two), *cli_args(PROFILE_ARGS))
    assert run.returncode == 0, run.stdout + run.stderr
    got = load_profile(two)
    assert got.extra["processes"] == 2 and ref.extra["processes"] == 1
    strip = lambda p: {k: v for k, v in p.to_json().items() if k != "extra"}  # timings differ
    assert_close(strip(ref), strip(got))
    infos = find_linears(load_model(str(tiny_model_dir)).model)
    for info in infos:
        a, b = load_factors(single, info.name), load_factors(two, info.name)
        for x, y in [(a.h_out_a, b.h_out_a), (a.h_in_b, b.h_in_b), (a.xtx_a, b.xtx_a), (a.h_out_b, b.h_out_b)]:
            assert rel_diff(x, y) < 1e-6
        assert (a.samples, a.tokens, a.grad_sq) == (b.samples, b.tokens, pytest.approx(b.grad_sq, rel=1e-9))
        assert a.window_grad_sq == pytest.approx(b.window_grad_sq, rel=1e-9)

    plan = solve(single, "4.5bpw")
    plan.save(tmp_path / "plan.json")
    one_ckpt = apply_plan(tmp_path / "plan.json", tmp_path / "q1", rounding="yaqa", profile_dir=single,
                          progress=False)
    run = torchrun("apply", str(tmp_path / "plan.json"), "--out", str(tmp_path / "q2"), "--profile", str(single))
    assert run.returncode == 0, run.stdout + run.stderr
    t1, t2 = load_file(str(tmp_path / "q1" / "model.safetensors")), load_file(str(tmp_path / "q2" / "model.safetensors"))
    assert set(t1) == set(t2) and all(torch.equal(t1[k], t2[k]) for k in t1)
    qc = [json.loads((tmp_path / q / "config.json").read_text())["quantization_config"] for q in ("q1", "q2")]
    assert qc[0]["layers"] == qc[1]["layers"] == json.loads(json.dumps(one_ckpt.stats))


def test_refusal_reaches_every_process(tmp_path, tiny_model_dir, tiny_text):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "profile.json").write_text("{}")
    run = torchrun("profile", str(tiny_model_dir), "--calib", str(tiny_text), "--out", str(out), *cli_args(PROFILE_ARGS))
    assert run.returncode != 0
    assert run.stderr.count("is not a bitplan profile") == 2  # both ranks say why, neither hangs
    assert (out / "profile.json").read_text() == "{}"
