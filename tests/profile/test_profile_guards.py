"""profile's guards: bad weights and damaged files fail with one clear line, one writer per output folder, and a
resumed job keeps the time and loses the temporaries of the run it resumes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.models import find_linears
from bitplan.profile import load_factors, load_profile, profile_model
from bitplan.profile.hessians import factors_path

from tests.profile.helpers import Interrupt, stop_at, tiny_llama, token_ids

KW = dict(sketch_chunk=4, noise_samples=2, formats="int4-g32,fp16", batch_size=2, checkpoint_every=2,
          progress=False, judge_samples=0)


def run(out: Path, model=None, **kw):
    return profile_model(model if model is not None else tiny_llama(), token_ids(8, 16), out_dir=out, **{**KW, **kw})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_model_with_a_non_finite_weight_is_refused_naming_the_layer(tmp_path, value):
    model = tiny_llama()
    bad = find_linears(model)[5].name
    with torch.no_grad():
        model.get_submodule(bad).weight[3, 7] = value
    with pytest.raises(BitplanError, match=f"{bad} holds 1 NaN or infinite"):
        run(tmp_path / "prof", model=model)
    assert not (tmp_path / "prof").exists()   # refused before any work


def test_a_truncated_hessian_file_names_the_file_and_how_to_remake_it(tmp_path):
    out = tmp_path / "prof"
    run(out, noise_samples=0)
    name = find_linears(tiny_llama())[0].name
    path = factors_path(out, name, "b")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BitplanError, match=r"Hessian file .* is damaged.*--overwrite") as e:
        load_factors(out, name)
    assert str(path) in str(e.value)


def _live_pid():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_second_run_into_a_folder_another_process_writes_is_refused(tmp_path):
    out = tmp_path / "prof"
    with pytest.raises(Interrupt):
        run(out, events=stop_at("layers", 3))
    assert not (out / ".job" / "lock").exists()   # released when the run stopped
    other = _live_pid()
    try:
        (out / ".job" / "lock").write_text(str(other.pid))
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        with pytest.raises(BitplanError, match=f"another bitplan profile \\(process {other.pid}\\) is writing"):
            run(out)
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    finally:
        other.kill()
        other.wait()
    # the holder has ended: its lock is stale, taken over, and the run finishes and leaves no lock behind
    profile = run(out)
    assert len(profile.layers) == len(find_linears(tiny_llama())) and not (out / ".job").exists()


def test_the_lock_is_taken_exclusively_and_holds_the_pid(tmp_path):
    out = tmp_path / "prof"
    seen = []

    def events(phase, count):
        if not seen:
            seen.append((out / ".job" / "lock").read_text())

    run(out, events=events)
    assert seen == [str(os.getpid())]


def test_a_resumed_job_keeps_the_time_of_the_phase_it_was_killed_in(tmp_path):
    out = tmp_path / "prof"

    def slow_then_killed(phase, count):
        if phase == "layers" and count == 1:
            time.sleep(0.5)
        if phase == "layers" and count == 2:
            raise Interrupt("layers 2")

    with pytest.raises(Interrupt):
        run(out, events=slow_then_killed)
    timing = json.loads((out / ".job" / "timing.json").read_text())
    assert timing["layers"] >= 0.5
    profile = run(out)
    assert profile.extra["timing_s"]["layers"] >= 0.5


def test_a_resumed_job_removes_the_temporaries_of_killed_writes(tmp_path):
    out = tmp_path / "prof"
    with pytest.raises(Interrupt):
        run(out, events=stop_at("layers", 2))
    name = find_linears(tiny_llama())[0].name
    orphans = [out / ".job" / ".factors-a.safetensors.x1y2.tmp", out / ".job" / "layers" / f".{name}.json.k3.tmp",
               factors_path(out, name, "a").parent / f".{name}.safetensors.q9.tmp"]
    for p in orphans:
        p.write_bytes(b"\0" * 1000)
    keep = out / "notes.tmp"   # not bitplan's: kept
    keep.write_text("mine")
    with pytest.raises(Interrupt):
        run(out, events=stop_at("layers", 4))   # the resumed run is killed again, its job folder still there
    assert (out / ".job").is_dir() and not any(p.exists() for p in orphans)
    assert keep.read_text() == "mine"
    run(out)
    assert load_profile(out).layers and not list(out.rglob(".*.tmp"))


def test_a_resumed_job_reports_the_peak_memory_of_every_segment(tmp_path):
    """profile.json's peak_rss_gb is the largest of the job's segments, not the last one's."""
    out = tmp_path / "prof"
    with pytest.raises(Interrupt):
        run(out, events=stop_at("layers", 2))
    recorded = json.loads((out / ".job" / "peak_rss.json").read_text())["gb"]
    assert recorded > 0
    # the killed segment stands for a larger one: more than the resumed process will ever reach
    (out / ".job" / "peak_rss.json").write_text(json.dumps({"gb": 999.0}))
    assert run(out).extra["peak_rss_gb"] == 999.0
