"""apply's input checks: a profile of another model and a bad --workers are refused with one line before any
rounding, never a shape traceback or silent rounding with another model's factors."""
from __future__ import annotations

import shutil

import pytest

from bitplan.apply import apply_formats
from bitplan.errors import BitplanError
from bitplan.models import find_linears
from bitplan.profile import profile_model
from bitplan.profile.hessians import HALVES, factors_path
from bitplan.profile.inputs import resolve_model

from tests.profile.helpers import tiny_llama, token_ids


@pytest.fixture
def profiled(tmp_path):
    model = tiny_llama()
    profile_model(model, token_ids(8, 16), out_dir=tmp_path / "prof", sketch_chunk=4, noise_samples=0,
                  formats="int4-g32,fp16", batch_size=2, progress=False, judge_samples=0)
    return model, tmp_path / "prof"


def test_a_profile_of_another_model_is_refused_before_rounding(profiled, tmp_path):
    _, prof = profiled
    other = resolve_model(tiny_llama(seed=1))   # same shapes, other weights: its factors would round silently
    formats = {i.name: "int4-g32" for i in find_linears(other.model)}
    with pytest.raises(BitplanError, match="is of another model"):
        apply_formats(other, formats, tmp_path / "q", profile_dir=prof, progress=False)
    assert not any((tmp_path / ".q.job").glob("*.safetensors"))


def test_factors_of_another_shape_name_the_layer(profiled, tmp_path):
    model, prof = profiled
    (prof / "profile.json").unlink()   # factors only: nothing records the model, the sizes still tell
    infos = find_linears(model)
    up = next(i for i in infos if i.kind == "up_proj")
    q = next(i for i in infos if i.kind == "q_proj" and i.block == up.block)
    assert up.shape != q.shape
    for half in HALVES:
        shutil.copy(factors_path(prof, q.name, half), factors_path(prof, up.name, half))
    with pytest.raises(BitplanError, match=f"factors of {up.name} .* another model"):
        apply_formats(resolve_model(model), {up.name: "int4-g32"}, tmp_path / "q", profile_dir=prof, progress=False)


@pytest.mark.parametrize("workers", [0, -1])
def test_workers_below_one_are_refused(profiled, tmp_path, workers):
    model, prof = profiled
    with pytest.raises(BitplanError, match="--workers must be a whole number"):
        apply_formats(resolve_model(model), {find_linears(model)[0].name: "int4-g32"}, tmp_path / "q",
                      rounding="rtn", workers=workers, progress=False)
