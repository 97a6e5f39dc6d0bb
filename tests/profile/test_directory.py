"""ProfileDir: apply's typed view of a profile folder, against the files and a recomputation from the factors."""
from __future__ import annotations

import shutil

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.heldout import crossfit
from bitplan.models import find_linears
from bitplan.profile import load_factors, load_profile, profile_model
from bitplan.profile.coefficients import rotated_halves
from bitplan.profile.directory import ProfileDir
from bitplan.profile.hessians import factors_path, read_half_factors, save_half_factors

from tests.profile.helpers import tiny_llama, token_ids


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("prof") / "p"
    profile_model(tiny_llama(), token_ids(8, 16), out_dir=out, noise_samples=0, formats="int3-g32",
                  judge_samples=0, progress=False)
    return out


def test_the_profile_s_shrinkage_is_the_held_out_choice_of_its_factors(folder):
    d = ProfileDir(folder)
    assert d.has_hessians and d.calibration == load_profile(folder).calibration
    for info in find_linears(tiny_llama()):
        f = load_factors(folder, info.name)
        cf = crossfit(*rotated_halves(f, "identity", with_xtx=False), name=info.name)   # recomputed
        got = d.shrinkage(info.name)
        assert (got.out, got.inp, got.target, got.samples) == (cf.shrink, cf.shrink_in, "identity", f.samples)
        assert got.out_gains == pytest.approx(cf.out_gains) and got.in_gains == pytest.approx(cf.in_gains)
        torch.testing.assert_close(d.factors(info.name, "yaqa").h_out, f.h_out, rtol=0, atol=0)
    assert d.shrinkage("model.layers.9.mlp.up_proj") is None


def test_factors_id_changes_with_the_files_and_ldlq_needs_input_moments(folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    d = ProfileDir(copy)
    name = find_linears(tiny_llama())[0].name
    before = d.factors_id(name)
    assert before == d.factors_id(name)
    path = factors_path(copy, name, "a")
    sums, meta = read_half_factors(path)
    sums.xtx = None   # as profiles written before Σxxᵀ was kept
    save_half_factors(path, name, "a", sums, meta["sketch_chunk"])
    assert d.factors_id(name) != before
    d.factors(name, "yaqa")
    with pytest.raises(BitplanError, match="lack Σxxᵀ"):
        d.factors(name, "ldlq")


def test_a_folder_without_hessians_or_without_profile_json(folder, tmp_path):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(folder / "profile.json", shipped / "profile.json")
    assert not ProfileDir(shipped).has_hessians and ProfileDir(shipped).calibration["samples"] == 8
    factors_only = tmp_path / "factors-only"
    shutil.copytree(folder / "hessians", factors_only / "hessians")
    d = ProfileDir(factors_only)
    assert d.has_hessians and d.calibration == {} and d.shrinkage(find_linears(tiny_llama())[0].name) is None


def test_the_profile_a_plan_records_is_found_from_the_cwd_or_the_plan_s_folder(folder, tmp_path, monkeypatch):
    plans = tmp_path / "plans"
    (plans / "prof").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert ProfileDir.recorded_in({"path": str(folder / "profile.json")}, plans / "plan.json").path == folder
    assert ProfileDir.recorded_in({"path": "prof"}, plans / "plan.json").path == plans / "prof"
    assert ProfileDir.recorded_in({"path": "elsewhere"}, plans / "plan.json") is None
    assert ProfileDir.recorded_in(None, plans / "plan.json") is None
    assert ProfileDir.of(None) is None and ProfileDir.of(str(folder)) == ProfileDir(folder)
