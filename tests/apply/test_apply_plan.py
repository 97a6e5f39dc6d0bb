"""profile → solve → apply on a tiny model: the plan's formats land in a loadable checkpoint, and bad plans fail."""
from __future__ import annotations

import json

import pytest
import torch

from bitplan.apply import apply_plan, load_quantized
from bitplan.apply.embedding import QuantizedEmbedding
from bitplan.apply.module import QuantizedLinear
from bitplan.errors import BitplanError
from bitplan.models import load_model
from bitplan.profile import profile_model
from bitplan.solve import solve

FORMATS = ["int2-g32", "int3-g32", "int4-g32", "higgs-p2-n64-g64", "fp16"]


@pytest.fixture
def tiny_plan(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir))
    windows = torch.randint(0, len(lm.tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    profile_model(lm, windows, out_dir=tmp_path / "prof", noise_samples=0, formats=FORMATS, judge_samples=0,
                  progress=False)
    plan = solve(tmp_path / "prof", "3.5bpw")
    plan.save(tmp_path / "plan.json")
    return lm, plan, tmp_path / "plan.json"


@pytest.mark.parametrize("rounding", ["yaqa", "ldlq", "rtn"])
def test_plan_becomes_a_checkpoint(tiny_plan, tmp_path, rounding):
    lm, plan, plan_path = tiny_plan
    result = apply_plan(plan_path, tmp_path / "q", model=lm, rounding=rounding, progress=False)
    assert result.formats == plan.formats
    loaded = load_quantized(tmp_path / "q")
    for layer in plan.layers:
        module = loaded.model.get_submodule(layer.name)
        if layer.kind in ("embedding", "head") and layer.format == "fp16":   # kept as the model's own fp16 tensor
            assert isinstance(module, (torch.nn.Embedding, torch.nn.Linear))
            continue
        quantized = QuantizedEmbedding if layer.kind == "embedding" else QuantizedLinear
        assert isinstance(module, quantized) and module.format.name == layer.format
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["rounding"] == rounding and qc["plan"]["budget"] == "3.5bpw"
    # The stored bytes of the quantized layers are what the plan accounted for (codes, scales, zeros, seeds).
    tensors = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tmp_path / "q" / "model.safetensors"))
    stored = sum(t.numel() * t.element_size() * 8 for k, t in tensors.items()
                 if any(k.startswith(n + ".") for n in plan.formats))
    assert stored == sum(layer.storage_bits for layer in plan.layers)


def test_yaqa_needs_hessians(tiny_plan, tmp_path):
    lm, plan, plan_path = tiny_plan
    import shutil

    shutil.rmtree(tmp_path / "prof" / "hessians")
    with pytest.raises(BitplanError, match="hessians"):
        apply_plan(plan_path, tmp_path / "q", model=lm, rounding="yaqa", progress=False)


def test_plan_for_other_weights_is_refused(tiny_plan, tmp_path):
    lm, plan, plan_path = tiny_plan
    with torch.no_grad():
        lm.model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    with pytest.raises(BitplanError, match="other weights"):
        apply_plan(plan_path, tmp_path / "q", model=lm, rounding="rtn", progress=False)


def test_auto_shrink_records_the_lambda_chosen_per_layer(tiny_plan, tmp_path):
    """--shrink auto: each layer's λ is the held-out choice from the profile's halves, and is in the metadata."""
    from bitplan.apply.run import auto_shrink
    from bitplan.profile.hessians import load_factors

    from bitplan.profile.schema import load_profile

    lm, plan, plan_path = tiny_plan
    apply_plan(plan_path, tmp_path / "q", model=lm, rounding="yaqa", shrink="auto", progress=False)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    in_profile = {r.name: (r.extra["shrink_out"], r.extra["shrink_in"]) for r in load_profile(tmp_path / "prof").layers}
    for name, fmt in plan.formats.items():
        if fmt == "fp16":
            continue
        stats = qc["layers"][name]
        expected = auto_shrink(load_factors(tmp_path / "prof", name), name)
        # the CSV shows what apply used
        assert (stats["shrink_out"], stats["shrink_in"]) == (expected.out, expected.inp) == in_profile[name]
        assert stats["shrink_target"] == "identity"
        assert min(stats["shrink_gains"].values()) == pytest.approx(expected.out_gains[expected.out])
        assert min(stats["shrink_in_gains"].values()) == pytest.approx(expected.in_gains[expected.inp])


def test_apply_takes_the_profile_s_lambdas_only_when_chosen_on_the_same_factors(tiny_plan, tmp_path):
    from bitplan.apply.run import auto_shrink
    from bitplan.profile.hessians import load_factors

    lm, plan, plan_path = tiny_plan
    path = tmp_path / "prof" / "profile.json"
    data = json.loads(path.read_text())
    same, other = [r for r in data["layers"] if plan.formats[r["name"]] != "fp16"][:2]
    for r in (same, other):
        r["extra"]["shrink_out"] = 0.1234   # off the grid: no held-out choice gives it
    other["extra"]["n_samples"] += 1        # chosen on other factors: apply chooses again
    path.write_text(json.dumps(data))
    apply_plan(plan_path, tmp_path / "q", model=lm, rounding="yaqa", shrink="auto", progress=False)
    layers = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["layers"]
    assert layers[same["name"]]["shrink_out"] == 0.1234
    expected = auto_shrink(load_factors(tmp_path / "prof", other["name"]), other["name"])
    assert layers[other["name"]]["shrink_out"] == expected.out != 0.1234


def test_the_apply_forecast_counts_the_lambda_choice_only_when_apply_makes_one(tiny_plan, tiny_model_dir, tmp_path,
                                                                             cli):
    """apply chooses yaqa's λs itself (reading both halves of every factor) exactly when the profile holds none
    for its factors and target: the dry-run says so and counts that layer's held-out LDLs."""
    from bitplan.resources import Available, ModelShape, apply_job, coefficient_bytes

    lm, plan, plan_path = tiny_plan
    free = Available(float("inf"), None)

    def job(**kw):
        return apply_job(plan_path, model=str(tiny_model_dir), profile_dir=tmp_path / "prof", workers=1,
                         device="cpu", free=free, **kw)[0]

    said = "chosen from both halves"
    plain = job()
    assert said not in plain.phases[0].note
    chosen = job(shrink_target="diagonal")     # the profile chose its λs toward the identity
    rounded = [n for n, f in plan.formats.items() if f != "fp16" and ".layers." in n]
    assert f"λs of {len(rounded)} {said}" in chosen.phases[0].note
    shape = ModelShape.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    widest = max(coefficient_bytes(x.out_features, x.in_features) for x in shape.linears()
                 if plan.formats.get(x.name, "fp16") != "fp16")
    assert plain.host_bytes < chosen.host_bytes <= plain.host_bytes + widest
    assert chosen.phases[0].times_fb > plain.phases[0].times_fb
    code, out, _ = cli("apply", plan_path, "-o", tmp_path / "q", "--model", tiny_model_dir, "--profile",
                       tmp_path / "prof", "--dry-run", "--shrink-target", "diagonal")
    assert code == 0 and f"λs of {len(rounded)} {said}" in " ".join(out.split())   # the CLI passes its options
    assert said not in job(shrink=0.1, shrink_target="diagonal").phases[0].note   # a λ given: nothing to choose
    assert said not in job(rounding="ldlq", shrink_target="diagonal").phases[0].note
    path = tmp_path / "prof" / "profile.json"
    data = json.loads(path.read_text())
    next(r for r in data["layers"] if plan.formats[r["name"]] != "fp16")["extra"]["n_samples"] += 1
    path.write_text(json.dumps(data))      # one layer's λs chosen on other factors: apply chooses again
    assert f"λs of 1 {said}" in job().phases[0].note


def test_apply_rounds_as_the_plan_was_solved_for_unless_told_otherwise(tiny_plan, tmp_path, capsys):
    """The common path needs no choice: a hessian plan from a profile without factors rounds to nearest, a yaqa
    plan with YAQA, a plan file from before plans recorded their rounding by its objective's."""
    import shutil

    lm, plan, plan_path = tiny_plan

    def rounding_of(ckpt) -> tuple[str, set[str]]:
        qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
        return qc["rounding"], {s["rounding"] for n, s in qc["layers"].items() if plan.formats[n] != "fp16"}

    assert plan.rounding == "yaqa"
    apply_plan(plan_path, tmp_path / "q", model=lm, progress=False)
    assert rounding_of(tmp_path / "q") == ("yaqa", {"yaqa"})

    hessian = solve(tmp_path / "prof", "3.5bpw", objective="hessian")
    hessian.save(tmp_path / "hessian.json")
    shutil.rmtree(tmp_path / "prof" / "hessians")     # as a shipped profile
    apply_plan(tmp_path / "hessian.json", tmp_path / "q2", model=lm, progress=False)
    assert rounding_of(tmp_path / "q2") == ("rtn", {"rtn"})
    assert "--objective" not in capsys.readouterr().err   # the plan's own rounding: no warning
    with pytest.raises(BitplanError, match="no hessians/"):   # an explicit rounding still overrides
        apply_plan(tmp_path / "hessian.json", tmp_path / "q3", model=lm, rounding="ldlq", progress=False)
    assert "solve with --objective ldlq" in " ".join(capsys.readouterr().err.split())

    old = json.loads((tmp_path / "hessian.json").read_text())
    del old["rounding"]
    old["objective"] = "yaqa"      # a plan file without the field: its objective decides
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(BitplanError, match="yaqa rounding needs Hessian factors"):
        apply_plan(tmp_path / "old.json", tmp_path / "q4", model=lm, progress=False)


def test_fixed_shrink_and_bad_values(tiny_plan, tmp_path):
    lm, plan, plan_path = tiny_plan
    apply_plan(plan_path, tmp_path / "q", model=lm, rounding="yaqa", shrink="0.6", progress=False)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert {s["shrink_out"] for n, s in qc["layers"].items() if plan.formats[n] != "fp16"} == {0.6}
    assert {s["shrink_in"] for n, s in qc["layers"].items() if plan.formats[n] != "fp16"} == {0.0}
    for bad in ("1.5", "-0.1", "often"):
        with pytest.raises(BitplanError, match="--shrink"):
            apply_plan(plan_path, tmp_path / "q2", model=lm, rounding="yaqa", shrink=bad, progress=False)
    with pytest.raises(BitplanError, match="shrinkage target"):
        apply_plan(plan_path, tmp_path / "q2", model=lm, rounding="yaqa", shrink_target="zero", progress=False)


def test_ldlq_on_a_profile_without_input_moments_is_a_clear_error(tiny_plan, tmp_path):
    """Profiles written before Σxxᵀ was kept still serve yaqa; ldlq says what to do."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    lm, plan, plan_path = tiny_plan
    for f in (tmp_path / "prof" / "hessians").rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys() if k != "xtx"}
        save_file(tensors, str(f), metadata=meta)
    with pytest.raises(BitplanError, match="re-run `bitplan profile`"):
        apply_plan(plan_path, tmp_path / "q", model=lm, rounding="ldlq", progress=False)
    apply_plan(plan_path, tmp_path / "q", model=lm, rounding="yaqa", progress=False)


def test_rounding_a_plan_another_way_than_its_objective_forecasts_warns(tiny_plan, tmp_path, capsys):
    from bitplan.apply.run import rounding_mismatch

    lm, plan, plan_path = tiny_plan
    assert plan.objective == "yaqa"
    apply_plan(plan_path, tmp_path / "q", model=lm, rounding="rtn", progress=False)
    err = " ".join(capsys.readouterr().err.split())
    assert "--objective yaqa" in err and "--objective hessian" in err
    apply_plan(plan_path, tmp_path / "q2", model=lm, rounding="yaqa", progress=False)
    assert "--objective" not in capsys.readouterr().err
    assert rounding_mismatch("hessian", "rtn") is None and rounding_mismatch("noise", "rtn") is None
    # within 10 % of the best plan's measured KL: no warning
    assert rounding_mismatch("yaqa-halves", "yaqa") is None and rounding_mismatch("ldlq", "yaqa") is None
    assert rounding_mismatch("hessian", "yaqa").endswith("solve with --objective yaqa")
    assert rounding_mismatch("noise", "ldlq").endswith("solve with --objective ldlq")
    assert rounding_mismatch("ldlq", "rtn").endswith("solve with --objective hessian")
