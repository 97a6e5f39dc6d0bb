"""profile_model end to end on tiny models: outputs, resume after an interruption, refusals of bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from bitplan.errors import BitplanError
from bitplan.models import find_linears
from bitplan.profile import load_factors, load_profile, profile_model
from bitplan.profile.coefficients import layer_coefficients
from bitplan.profile.hessians import HALVES, factors_path, read_half_factors, save_half_factors
from bitplan.profile.report import COLUMNS, sensitivity_table
from bitplan.profile.inputs import split_halves

from tests.profile.helpers import Interrupt, stop_at, tiny_llama, token_ids

FORMATS = "int4-g32,int3-g64,fp16"
KW = dict(sketch_chunk=4, noise_samples=2, formats=FORMATS, batch_size=2, checkpoint_every=2, progress=False,
          judge_samples=0)


def run(out: Path, model=None, ids=None, **kw):
    return profile_model(model if model is not None else tiny_llama(),
                         ids if ids is not None else token_ids(8, 16), out_dir=out, **{**KW, **kw})


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_outputs(tmp_path):
    out = tmp_path / "prof"
    profile = run(out)
    assert not (out / ".job").exists()
    loaded = load_profile(out)
    assert loaded.to_json() == profile.to_json()
    model = tiny_llama()
    infos = find_linears(model)
    assert [r.name for r in loaded.layers] == [i.name for i in infos]
    assert loaded.calibration["tokens"] == 8 * 16 and loaded.calibration["halves"] == {"split": "contiguous", "a": 4, "b": 4}
    assert loaded.settings["sketch_chunk"] == 4 and loaded.formats == FORMATS.split(",")
    for r in loaded.layers:
        assert r.alpha_hessian > 0 and r.alpha_noise is not None and r.alpha_yaqa_heldout is not None
        assert r.alpha_yaqa <= r.extra["alpha_shaped"] * 1.01 ** 2   # in-sample LDL never loses (up to the damping)
        assert set(r.rel_err) == set(FORMATS.split(","))
        assert r.rel_err["int3-g64"] > r.rel_err["int4-g32"] > r.rel_err["fp16"]
        assert r.extra["n_samples"] == 8 * 4  # 16 tokens in chunks of 4
    df = pd.read_csv(out / "sensitivity.csv")
    # the untied tiny model's embedding and head follow the block linears
    assert list(df.columns[:len(COLUMNS)]) == COLUMNS and len(df) == len(infos) + 2
    assert df["kind"].tolist()[-2:] == ["embedding", "head"] and df["block"].tolist()[-2:] == [-1, 2]
    df = df[:len(infos)]
    assert df["yaqa_gain"].tolist() == pytest.approx((df["alpha_yaqa"] / df["alpha_shaped"]).tolist(), rel=1e-5)
    f = load_factors(out, infos[0].name)
    assert f.tokens_a == f.tokens_b == 4 * 16 and f.samples == 32
    rec = loaded.layers[0]
    assert rec.trace_h_out == pytest.approx(float(torch.trace(f.h_out)), rel=1e-5)
    assert sensitivity_table(loaded).row_count == len(infos)
    # α's scale is the whole windows' gradient norm, not the chunks' (which lack the cross-chunk terms)
    assert f.window_grad_sq != pytest.approx(f.grad_sq, rel=1e-3)
    assert rec.extra["grad_sq_per_token"] == pytest.approx(f.window_grad_sq / f.tokens, rel=1e-9)
    assert rec.extra["grad_sq_per_sample"] == pytest.approx(f.grad_sq / f.samples, rel=1e-9)
    # adaptive rounding's α is at the factors' own (per-chunk) scale, with the gain the CSV shows
    assert rec.extra["alpha_shaped"] == pytest.approx(rec.alpha_hessian * f.grad_sq / f.window_grad_sq, rel=1e-9)
    assert rec.alpha_yaqa_heldout == pytest.approx(rec.extra["alpha_shaped"] * rec.extra["yaqa_gain_heldout"], rel=1e-9)
    assert df["yaqa_gain_heldout"][0] == pytest.approx(rec.extra["yaqa_gain_heldout"], rel=1e-5)


def test_factor_files_without_window_norms_fall_back_to_the_chunks(tmp_path):
    """Profiles written before window_grad_sq was kept still load; α then scales by Σ_c‖G_c‖² as it did."""
    out = tmp_path / "prof"
    run(out)
    name = find_linears(tiny_llama())[0].name
    for half in HALVES:
        sums, meta = read_half_factors(factors_path(out, name, half))
        sums.window_grad_sq = None
        save_half_factors(factors_path(out, name, half), name, half, sums, meta["sketch_chunk"])
    f = load_factors(out, name)
    assert f.window_grad_sq is None
    coef = layer_coefficients(f, 1.0)
    assert coef.grad_sq_per_token == pytest.approx(f.grad_sq / f.tokens, rel=1e-12)


def test_halves_are_a_seeded_partition():
    a, b = split_halves(9, 3, "random")
    assert sorted(a + b) == list(range(9)) and len(a) == 4
    assert split_halves(9, 3, "random") == (a, b) and split_halves(9, 4, "random") != (a, b)


def test_contiguous_halves_split_by_position_in_the_source():
    positions = torch.tensor([700, 0, 350, 210, 910, 140, 560, 70, 420])
    a, b = split_halves(9, 3, "contiguous", positions)
    assert a == [1, 3, 5, 7] and b == [0, 2, 4, 6, 8] and a == sorted(a) and b == sorted(b)
    assert max(positions[a]) < min(positions[b])  # every window of a comes earlier in the text than any of b
    assert split_halves(9, 4, "contiguous", positions) == (a, b)  # the seed chose the windows, not the split
    assert split_halves(4, 0, "contiguous") == ([0, 1], [2, 3])  # token ids: row order stands for position
    with pytest.raises(BitplanError, match="--halves"):
        split_halves(4, 0, "alternate")


def test_contiguous_halves_accumulate_each_half_of_the_rows(tmp_path):
    """Token ids with contiguous halves: half a's factors are those of the first rows, b's of the rest (a random
    split's halves, taken from the same rows, differ)."""
    ids = token_ids(8, 16)
    full = run(tmp_path / "contiguous", ids=ids, noise_samples=0)  # the default
    first = run(tmp_path / "first", ids=ids[:4], noise_samples=0)
    name = full.layers[0].name
    f, g = load_factors(tmp_path / "contiguous", name), load_factors(tmp_path / "first", name)
    torch.testing.assert_close(f.h_in_a, g.h_in_a + g.h_in_b, rtol=1e-5, atol=1e-6 * float(f.h_in_a.abs().max()))
    assert full.calibration["halves"]["split"] == "contiguous"
    assert split_halves(8, 0, "random")[0] != [0, 1, 2, 3]
    run(tmp_path / "random", ids=ids, halves="random", noise_samples=0)
    assert not torch.allclose(load_factors(tmp_path / "random", name).h_in_a, f.h_in_a, rtol=1e-3)


# 8 windows = 2 halves × 2 batches of 2, a checkpoint after every batch but a half's last (its files are written
# then); 14 layers, then the embedding and head (their gradient pass is one result: "outer", 2). `after` is the
# first event of the resumed run: finished work is not redone.
@pytest.mark.parametrize("phase,count,after", [("noise", 5, ("noise", 6)), ("factors-a", 1, ("factors-a-done", 2)),
                                               ("factors-a-done", 2, ("factors-b", 1)),
                                               ("factors-b", 1, ("factors-b-done", 2)),
                                               ("factors-b-done", 2, ("outer", 2)), ("outer", 2, ("layers", 1)),
                                               ("noise", 15, ("noise", 16)), ("layers", 9, ("layers", 10)),
                                               ("formats", 3, ("formats", 4))])
def test_resume_equals_uninterrupted(tmp_path, phase, count, after):
    ref = run(tmp_path / "ref")
    out = tmp_path / "cut"
    with pytest.raises(Interrupt):
        run(out, events=stop_at(phase, count))
    assert (out / ".job").is_dir() and not (out / "profile.json").exists()
    seen = []
    resumed = run(out, events=lambda p, c: seen.append((p, c)))
    assert seen[0] == after
    strip = lambda j: {k: v for k, v in j.items() if k != "extra"}  # timings differ
    assert strip(resumed.to_json()) == strip(ref.to_json())
    for info in find_linears(tiny_llama()):
        a, b = load_factors(tmp_path / "ref", info.name), load_factors(out, info.name)
        assert torch.equal(a.h_out_a, b.h_out_a) and torch.equal(a.h_in_b, b.h_in_b)


def test_finished_profile_is_not_recomputed(tmp_path):
    out = tmp_path / "prof"
    run(out)
    before = snapshot(out)
    calls = []
    run(out, events=lambda p, c: calls.append(p))
    assert calls == [] and snapshot(out) == before


def test_finished_profile_asked_for_other_formats_measures_only_those(tmp_path):
    out = tmp_path / "prof"
    first = run(out)
    calls = []
    second = run(out, formats="int4-g32,int2-g32", events=lambda p, c: calls.append(p))
    assert set(calls) == {"formats"} and len(calls) == len(first.plannable)
    assert second.formats == ["int4-g32", "int2-g32"]
    for a, b in zip(first.plannable, load_profile(out).plannable):
        assert b.rel_err["int4-g32"] == a.rel_err["int4-g32"] and b.rel_err["int2-g32"] > a.rel_err["int3-g64"]
        assert b.alpha_hessian == a.alpha_hessian and b.alpha_noise == a.alpha_noise


def test_a_killed_format_update_resumes_at_the_layer_it_reached(tmp_path, monkeypatch):
    import bitplan.profile.phases as phases

    out = tmp_path / "prof"
    run(out)
    before = snapshot(out)
    with pytest.raises(Interrupt):
        run(out, formats="int4-g32,int2-g32", events=stop_at("formats", 3))
    assert {k: v for k, v in snapshot(out).items() if not k.startswith(".job")} == before   # nothing rewritten
    measured = []
    real = phases.relative_errors
    monkeypatch.setattr(phases, "relative_errors", lambda W, name, f: measured.append(name) or real(W, name, f))
    resumed = run(out, formats="int4-g32,int2-g32")
    layers = [r.name for r in resumed.plannable]
    assert measured == layers[3:]   # the first three layers' errors were saved before the kill
    run(tmp_path / "fresh")   # the same update, never killed
    fresh = run(tmp_path / "fresh", formats="int4-g32,int2-g32")
    assert [r.rel_err for r in resumed.plannable] == [r.rel_err for r in fresh.plannable]
    assert not (out / ".job").exists()   # the saved errors are in profile.json; the job folder is gone


def test_other_model_in_out_dir_is_refused(tmp_path):
    out = tmp_path / "prof"
    run(out)
    before = snapshot(out)
    with pytest.raises(BitplanError, match="another model"):
        run(out, model=tiny_llama(seed=1))
    assert snapshot(out) == before


def test_other_model_partial_job_is_refused(tmp_path):
    out = tmp_path / "prof"
    with pytest.raises(Interrupt):
        run(out, events=stop_at("factors-a", 1))
    before = snapshot(out)
    with pytest.raises(BitplanError, match="another model"):
        run(out, model=tiny_llama(seed=1))
    assert snapshot(out) == before


def test_other_settings_need_a_new_out_or_overwrite(tmp_path):
    out = tmp_path / "prof"
    run(out)
    before = snapshot(out)
    with pytest.raises(BitplanError, match=r"other settings \(sketch_chunk: 4 vs 8\).*--overwrite"):
        run(out, sketch_chunk=8)
    assert snapshot(out) == before
    (out / "notes.txt").write_text("mine")
    profile = run(out, sketch_chunk=8, overwrite=True)
    assert profile.settings["sketch_chunk"] == 8 and (out / "notes.txt").read_text() == "mine"


def test_foreign_files_in_out_dir_are_refused(tmp_path):
    out = tmp_path / "prof"
    (out / "hessians").mkdir(parents=True)
    with pytest.raises(BitplanError, match="no profile.json"):
        run(out)


def test_calibration_text_shorter_than_a_window(tmp_path, tiny_model_dir):
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    out = tmp_path / "prof"
    with pytest.raises(BitplanError, match="shorter than one window"):
        profile_model(str(tiny_model_dir), str(short), samples=4, seqlen=64, out_dir=out, progress=False)
    assert not out.exists()


def test_model_without_quantizable_layers(tmp_path):
    class NoLinears(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(16, 8)
            self.layers = nn.ModuleList([nn.LayerNorm(8) for _ in range(2)])

        def get_input_embeddings(self):
            return self.embed

    out = tmp_path / "prof"
    with pytest.raises(BitplanError, match="no quantizable linear layers"):
        profile_model(NoLinears(), token_ids(4, 8), out_dir=out, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("kw,match", [(dict(sketch_chunk=0), "sketch-chunk"), (dict(noise_samples=9), "noise-samples"),
                                      (dict(formats="int4-g127"), "unknown format")])
def test_bad_settings(tmp_path, kw, match):
    with pytest.raises(BitplanError, match=match):
        run(tmp_path / "prof", **kw)
    assert not (tmp_path / "prof").exists()


def test_text_calibration_and_cli(tmp_path, tiny_model_dir, tiny_text):
    from typer.testing import CliRunner

    from bitplan.cli import app

    out = tmp_path / "prof"
    args = ["profile", str(tiny_model_dir), "--calib", str(tiny_text), "--samples", "4", "--seqlen", "32",
            "--sketch-chunk", "8", "--noise-samples", "2", "--formats", FORMATS, "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Spearman" in result.output
    data = json.loads((out / "profile.json").read_text())
    assert data["calibration"]["source"] == str(tiny_text) and len(data["calibration"]["sha256"]) == 64
    assert data["calibration"]["tokens"] == 4 * 32
    assert data["extra"]["judge"]["settings"]["samples"] == 64   # on by default: the tiny model names a BOS
    bad = CliRunner().invoke(app, args[:-1] + [str(tmp_path / "other")] + ["--samples", "100000"])
    assert isinstance(bad.exception, BitplanError)


def test_factor_groups_give_the_same_factors(tmp_path):
    """--factor-groups 3 runs the calibration three times, each for a third of the layers: identical sums, also
    when interrupted inside the second group and resumed."""
    ref = run(tmp_path / "ref")
    seen = []

    def second_group_checkpoint(phase: str, count: int) -> None:
        seen.append(phase)
        if seen.count("factors-a") == 2:  # each group checkpoints after its first batch of half a
            raise Interrupt(phase)

    with pytest.raises(Interrupt):
        run(tmp_path / "g3", factor_groups=3, events=second_group_checkpoint)
    assert (tmp_path / "g3" / ".job" / "factors-a.g0of3.done").is_file()
    grouped = run(tmp_path / "g3", factor_groups=3)
    strip = lambda j: {k: v for k, v in j.items() if k not in ("extra", "settings")}
    assert strip(grouped.to_json()) == strip(ref.to_json())
    for info in find_linears(tiny_llama()):
        a, b = load_factors(tmp_path / "ref", info.name), load_factors(tmp_path / "g3", info.name)
        assert torch.equal(a.h_out_a, b.h_out_a) and torch.equal(a.h_in_b, b.h_in_b) and torch.equal(a.xtx_a, b.xtx_a)
    with pytest.raises(BitplanError, match="--factor-groups"):
        run(tmp_path / "bad", factor_groups=0)


def test_a_log_sees_every_phase_end(tmp_path, capsys):
    """stderr not a terminal (pytest captures it): each phase writes plain progress lines that end at N/N."""
    model = tiny_llama()
    model.config.bos_token_id = 1
    run(tmp_path / "prof", model, progress=True, judge_samples=2)
    err = capsys.readouterr().err
    n = len(find_linears(model))
    a = n + 2   # the embedding and the untied head too
    for line in (f"noise injection: {a}/{a}", "factors, half a: 4/4", "factors, half b: 4/4",
                 "embedding and head gradients: 8/8",
                 f"coefficients (block LDL): {n}/{n}", f"format errors: {a}/{a}", "judge: sampling from the model: 2/2",
                 "judge: factors: 2/2", f"judge: judging each layer's fit: {n}/{n}"):
        assert f"\n{line}, " in "\n" + err, line
