"""Where apply writes: a user's files beside a checkpoint are never deleted, bad output folders are refused before
any work, and a plan over its own budget does not pass silently."""
from __future__ import annotations

import json

import pytest

import bitplan.apply.run as run
from bitplan.apply import apply_formats, apply_plan, load_quantized
from bitplan.apply.checkpoint import OWNED_MARKER
from bitplan.errors import BitplanError
from bitplan.models import find_linears, load_model

from tests.apply.test_apply_plan import tiny_plan  # noqa: F401 (a fixture)


def uniform(lm, fmt: str) -> dict[str, str]:
    return {info.name: fmt for info in find_linears(lm.model)}


def stored_formats(folder) -> dict[str, str]:
    return json.loads((folder / "config.json").read_text())["quantization_config"]["modules"]


def test_replacing_a_checkpoint_needs_overwrite_and_keeps_the_users_files(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir))
    out = tmp_path / "q"
    apply_formats(lm, uniform(lm, "int4-g32"), out, rounding="rtn", progress=False)
    (out / "eval.json").write_text('{"kl": 0.1}')
    (out / "results").mkdir()
    (out / "results" / "notes.txt").write_text("mine")
    ours = set(json.loads((out / "config.json").read_text())["quantization_config"]["written_files"])
    assert {"config.json", "model.safetensors"} <= ours and "eval.json" not in ours

    with pytest.raises(BitplanError, match="--overwrite"):
        apply_formats(lm, uniform(lm, "int3-g64"), out, rounding="rtn", progress=False)
    assert stored_formats(out) == uniform(lm, "int4-g32")

    apply_formats(lm, uniform(lm, "int3-g64"), out, rounding="rtn", progress=False, overwrite=True)
    assert stored_formats(out) == uniform(lm, "int3-g64")
    assert load_quantized(out).model.get_submodule(next(iter(uniform(lm, "x")))).format.name == "int3-g64"
    assert (out / "eval.json").read_text() == '{"kl": 0.1}'
    assert (out / "results" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "tiny-llama"]   # no .q.old, no .q.job left


def test_folders_beside_the_checkpoint_that_bitplan_did_not_make_are_never_deleted(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir))
    formats = uniform(lm, "int4-g32")
    out = tmp_path / "q"
    job = tmp_path / ".q.job"
    job.mkdir()
    (job / "mine.txt").write_text("keep")
    with pytest.raises(BitplanError, match="not made by"):
        apply_formats(lm, formats, out, rounding="rtn", progress=False)
    assert (job / "mine.txt").read_text() == "keep" and not out.exists()
    (job / "mine.txt").unlink()
    job.rmdir()

    apply_formats(lm, formats, out, rounding="rtn", progress=False)
    assert not job.exists()
    old = tmp_path / ".q.old"
    old.mkdir()
    (old / "mine.txt").write_text("keep")
    with pytest.raises(BitplanError, match="not made by"):
        apply_formats(lm, formats, out, rounding="rtn", progress=False, overwrite=True)
    assert (old / "mine.txt").read_text() == "keep"


def test_a_job_folder_keeps_what_bitplan_did_not_put_there(tiny_model_dir, tmp_path):
    """A marked job folder is bitplan's, but only its part files and marker are deleted at the end."""
    lm = load_model(str(tiny_model_dir))
    formats = uniform(lm, "int4-g32")
    out = tmp_path / "q"
    job = tmp_path / ".q.job"
    job.mkdir()
    (job / OWNED_MARKER).write_text("")
    (job / "mine.txt").write_text("keep")
    apply_formats(lm, formats, out, rounding="rtn", progress=False)
    assert sorted(p.name for p in job.iterdir()) == ["mine.txt"]


def test_output_folders_are_checked_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    import bitplan.apply.source as source

    monkeypatch.setattr(source, "load_model", no_loading)   # the model loaded whole
    monkeypatch.setattr(source, "open_lazy", no_loading)    # or read from its shards
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    formats = {"model.layers.0.mlp.up_proj": "int4-g32"}
    with pytest.raises(BitplanError, match="refusing to overwrite"):
        apply_formats(str(tiny_model_dir), formats, precious, rounding="rtn", progress=False)
    with pytest.raises(BitplanError, match="refusing to overwrite"):
        apply_plan(tmp_path / "plan.json", precious, model=str(tiny_model_dir), rounding="rtn", progress=False)
    with pytest.raises(BitplanError, match="not a folder"):
        apply_formats(str(tiny_model_dir), formats, "/dev/null/q", rounding="rtn", progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(BitplanError, match="is a file"):
        apply_formats(str(tiny_model_dir), formats, tmp_path / "file", rounding="rtn", progress=False)
    with pytest.raises(BitplanError, match="not a folder"):
        apply_formats(str(tiny_model_dir), formats, tmp_path / "file" / "q", rounding="rtn", progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_a_plan_over_its_budget_is_said_loudly_and_refused_when_strict(tiny_plan, tmp_path, capsys):  # noqa: F811
    lm, plan, plan_path = tiny_plan
    data = json.loads(plan_path.read_text())
    for layer in data["layers"]:
        layer["format"] = "fp16"   # 16 bits per weight against 3.5
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))

    with pytest.raises(BitplanError, match=r"over its budget 3\.5bpw.*--strict"):
        apply_plan(edited, tmp_path / "strict", model=lm, rounding="rtn", progress=False, strict=True)
    assert not (tmp_path / "strict").exists()

    capsys.readouterr()
    apply_plan(edited, tmp_path / "q", model=lm, rounding="rtn", progress=False)
    err = " ".join(capsys.readouterr().err.split())
    assert "warning:" in err and "over its budget 3.5bpw" in err and "16.0" in err

    apply_plan(plan_path, tmp_path / "ok", model=lm, rounding="rtn", progress=False, strict=True)
    assert "over its budget" not in capsys.readouterr().err

