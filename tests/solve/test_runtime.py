"""`solve --runtime vllm`: only formats vLLM runs, q/k/v and gate/up tied (DP and ILP against brute force), the
embedding and head fp16, and plans that say vllm re-checked on load."""
from __future__ import annotations

import json
import re

import pytest

from bitplan.errors import BitplanError
from bitplan.formats import get_format, runtime_formats
from bitplan.solve import load_plan, solve
from bitplan.solve.synthetic import synthetic_profile

from .helpers import profile_brute_force

SHAPES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
          "gate_proj": (96, 64), "up_proj": (96, 64), "down_proj": (64, 96)}
FORMATS = ["sint2-g32", "sint3-g64", "sint4-g64", "uint4-g32", "sint8-g32", "int3-g64", "fp16"]
VLLM_HERE = [f for f in FORMATS if f != "int3-g64"]


@pytest.fixture
def profile():
    return synthetic_profile(blocks=2, shapes=SHAPES, formats=[get_format(f) for f in FORMATS], seed=3, vocab=100,
                             hidden=64)


def fused_groups(prof) -> list[list[str]]:
    out = []
    for block in sorted({r.block for r in prof.layers}):
        for kinds in (("q", "k", "v"), ("gate", "up")):
            out.append([r.name for r in prof.layers if r.block == block and r.kind.removesuffix("_proj") in kinds])
    return out


@pytest.mark.parametrize("bpw", [2.9, 3.6, 4.4, 6.0])
def test_dp_and_ilp_match_brute_force_over_tied_vllm_assignments(profile, bpw):
    """The brute force enumerates per-layer formats with q/k/v and gate/up equal per block, from the formats
    vLLM runs; both solvers reach its optimum and keep the fused groups in one format."""
    groups = fused_groups(profile)
    budget_bits = int(bpw * sum(r.params for r in profile.layers))
    # vLLM needs whole groups: down_proj's 96 inputs rule out g64
    options = {r.name: [f for f in VLLM_HERE if f == "fp16" or r.shape[1] % get_format(f).group_size == 0]
               for r in profile.layers}
    assert options["model.layers.0.mlp.down_proj"] == ["sint2-g32", "uint4-g32", "sint8-g32", "fp16"]
    ref = profile_brute_force(profile, options, groups, budget_bits, "yaqa")
    assert ref is not None
    for solver in ("dp", "ilp"):
        plan = solve(profile, f"{bpw}bpw", solver=solver, formats=",".join(FORMATS[:-2]) + ",fp16",
                     runtime="vllm", notes_to_stderr=False)
        assert abs(plan.totals["predicted_dkl"] - ref[0]) <= 1e-9 * ref[0], solver
        got = plan.formats
        for g in groups:
            assert len({got[n] for n in g}) == 1, (solver, [got[n] for n in g])
        assert all(got[n] in options[n] for n in got)
        # without the runtime the same budget can untie them and predict no more (the tied optimum is feasible)
        free = solve(profile, f"{bpw}bpw", solver=solver, formats=",".join(VLLM_HERE), notes_to_stderr=False)
        assert free.totals["predicted_dkl"] <= plan.totals["predicted_dkl"] * (1 + 1e-9)


def test_default_menu_is_the_vllm_formats_and_plan_records_runtime(profile, tmp_path):
    plan = solve(profile, "4.5bpw", runtime="vllm", notes_to_stderr=False)
    assert plan.runtime == "vllm" and plan.scope == "blocks"
    assert set(plan.constraints["formats"]) == {f.name for f in runtime_formats("vllm")}
    assert {"qkv", "gateup"} <= set(plan.constraints["tie"])
    assert all(lp.format == "fp16" for lp in plan.layers if lp.outer)
    plan.save(tmp_path / "plan.json")
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["runtime"] == "vllm"
    again = load_plan(tmp_path / "plan.json", profile)
    assert again.runtime == "vllm" and again.formats == plan.formats
    # a plan without the field (written before it) is an `any` plan
    del data["runtime"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert load_plan(tmp_path / "old.json", profile).runtime == "any"
    # a named menu is narrowed to what vLLM runs, not refused
    narrowed = solve(profile, "4.5bpw", runtime="vllm", formats="profile", notes_to_stderr=False)
    assert set(narrowed.constraints["formats"]) == set(VLLM_HERE)


@pytest.mark.parametrize("kwargs, message", [
    ({"formats": "sint4-g64,int3-g64,fp16"}, r"--formats int3-g64: --runtime vllm cannot run it: it rotates"),
    ({"formats": "sint4-g64,uint3-g64"}, r"uint3-g64.*only at 4 and 8 bits"),
    ({"formats": "q4_0,fp16"}, r"q4_0.*llama\.cpp"),
    ({"formats": "ggml"}, r"holds no quantized format vllm runs"),
    ({"pins": [r"down_proj=int3-g64"]}, r"--pin down_proj=int3-g64: --runtime vllm cannot run it"),
    ({"pins": [r"embed_tokens=sint8-g32"]}, r"keeps model\.embed_tokens \(embedding\) fp16"),
    ({"scope": "all"}, r"--runtime vllm plans the block linears only"),
    ({"pins": [r"mlp=sint4-g64"]}, r"cannot run it on model\.layers\.0\.mlp\.down_proj: its 96 inputs are not a "
                                   r"whole number of groups of 64"),
    ({"runtime": "tgi"}, r"unknown runtime 'tgi'"),
])
def test_refusals(profile, kwargs, message):
    kwargs = {"runtime": "vllm", **kwargs}
    if "embed_tokens" in str(kwargs.get("pins")):
        profile = with_outer(profile)
    with pytest.raises(BitplanError, match=message):
        solve(profile, "4.5bpw", notes_to_stderr=False, **kwargs)


def with_outer(prof):
    """The profile with records of the embedding (tied to the head), as a profile that measured them has."""
    from bitplan.profile.schema import LayerRecord

    rec = LayerRecord(name="model.embed_tokens", block=-1, kind="embedding", shape=(100, 64), weight_sq_norm=1.0,
                      ties=["lm_head"])
    rec.alpha_noise = rec.alpha_hessian = rec.alpha_yaqa_heldout = 1e-3
    prof.outer_layers = [rec]
    return prof


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.update({"model.layers.1.self_attn.k_proj": "sint8-g32"}),
     r"layer model\.layers\.1\.self_attn\.k_proj is sint8-g32 but model\.layers\.1\.self_attn\.q_proj is .*qkv_proj"),
    (lambda f: f.update({"model.layers.0.mlp.up_proj": "sint8-g32"}),
     r"layer model\.layers\.0\.mlp\.up_proj is sint8-g32 but model\.layers\.0\.mlp\.gate_proj is .*gate_up_proj"),
    (lambda f: f.update({"model.layers.1.mlp.down_proj": "sint3-g64"}),
     r"layer model\.layers\.1\.mlp\.down_proj is sint3-g64, which vllm cannot run: its 96 inputs"),
    (lambda f: f.update({"model.layers.0.mlp.down_proj": "int3-g64"}),
     r"layer model\.layers\.0\.mlp\.down_proj is int3-g64, which vllm cannot run: it rotates"),
])
def test_load_plan_rechecks_an_edited_vllm_plan(profile, tmp_path, edit, message):
    plan = solve(profile, "4.5bpw", solver="dp", formats="sint4-g32,sint3-g32,fp16", runtime="vllm",
                 notes_to_stderr=False)
    data = plan.to_json()
    formats = {lp["name"]: lp["format"] for lp in data["layers"]}
    edit(formats)
    for lp in data["layers"]:
        lp["format"] = formats[lp["name"]]
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(BitplanError, match=message):
        load_plan(tmp_path / "plan.json", profile)
    # the same edit in an `any` plan is accepted
    data["runtime"] = "any"
    (tmp_path / "any.json").write_text(json.dumps(data))
    assert load_plan(tmp_path / "any.json", profile).formats == formats


def test_runtime_any_is_unchanged(profile):
    """Without --runtime the tie groups and candidates are the user's alone."""
    plan = solve(profile, "3.5bpw", formats=",".join(FORMATS), notes_to_stderr=False)
    assert plan.runtime == "any" and plan.constraints["tie"] == []
    assert re.fullmatch(r"any", plan.to_json()["runtime"])


def test_cli(profile, tmp_path, cli):
    """`bitplan solve --runtime vllm` writes a vllm plan; a format it cannot run is one line and exit code 2."""
    profile.save(tmp_path / "prof" / "profile.json")
    code, out, err = cli("solve", tmp_path / "prof", "-b", "4.5bpw", "--runtime", "vllm",
                         "-o", tmp_path / "plan.json")
    assert code == 0 and "runtime vllm" in out
    plan = load_plan(tmp_path / "plan.json")
    assert plan.runtime == "vllm" and set(plan.formats.values()) <= {f.name for f in runtime_formats("vllm")}
    code, out, err = cli("solve", tmp_path / "prof", "-b", "4.5bpw", "--runtime", "vllm",
                         "--formats", "int3-g64", "-o", tmp_path / "bad.json")
    assert code == 2 and "int3-g64" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3
    assert not (tmp_path / "bad.json").exists()
