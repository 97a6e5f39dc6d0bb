"""bitplan eval: statistics against an independent float64 computation, identities, caching, bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.special import log_softmax

from bitplan.errors import BitplanError
from bitplan.evaluate import evaluate, summarize, token_stats
from bitplan.logit_cache import LogitCache
from bitplan.models import load_model

from tests.conftest import make_tokenizer, tiny_llama


def reference_stats(ref: np.ndarray, cand: np.ndarray, targets: np.ndarray) -> dict:
    """The same statistics, written independently in numpy float64 from the definitions."""
    lp, lq = log_softmax(ref.astype(np.float64), axis=-1), log_softmax(cand.astype(np.float64), axis=-1)
    kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    t = targets
    rows = np.arange(len(t))
    nll_p, nll_q = -lp[rows, t], -lq[rows, t]
    agree = (ref.argmax(-1) == cand.argmax(-1)).astype(np.float64)
    dp = np.exp(-nll_q) - np.exp(-nll_p)
    n = len(kl)
    return dict(kl_mean=kl.mean(), kl_se=np.sqrt(np.var(kl, ddof=1) / n), kl_median=np.median(kl),
                kl_p90=np.percentile(kl, 90), kl_p99=np.percentile(kl, 99), kl_p999=np.percentile(kl, 99.9),
                kl_max=kl.max(), top1_agreement=agree.mean(),
                top1_se=np.sqrt(agree.mean() * (1 - agree.mean()) / (n - 1)),
                ppl_reference=np.exp(nll_p.mean()), ppl_candidate=np.exp(nll_q.mean()),
                ppl_ratio=np.exp(nll_q.mean()) / np.exp(nll_p.mean()), rms_dp=np.sqrt(np.mean(dp ** 2)))


def test_stats_match_float64_reference():
    rng = np.random.default_rng(0)
    T, V = 300, 500
    ref = rng.normal(0, 3, (T, V)).astype(np.float32)
    cand = (ref + rng.normal(0, 0.5, (T, V))).astype(np.float32)
    window = rng.integers(0, V, T + 1)
    ours = summarize([token_stats(torch.from_numpy(ref[:150]), torch.from_numpy(cand[:150]), torch.from_numpy(window[:151])),
                      token_stats(torch.from_numpy(ref[150:]), torch.from_numpy(cand[150:]), torch.from_numpy(window[150:]))])
    expected = reference_stats(ref, cand, window[1:])
    assert ours["tokens"] == T
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-12), key
    assert 0 < ours["top1_agreement"] < 1 and ours["kl_mean"] > 0


def test_identical_logits_give_zero():
    logits = torch.randn(50, 40)
    window = torch.randint(0, 40, (51,))
    s = summarize([token_stats(logits, logits.clone(), window)])
    assert s["kl_max"] == 0 and s["top1_agreement"] == 1 and s["ppl_ratio"] == 1 and s["rms_dp"] == 0


def test_nan_logits_are_an_error():
    logits = torch.randn(5, 10)
    bad = logits.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(BitplanError, match="NaN"):
        token_stats(logits, bad, torch.randint(0, 10, (6,)))


def noisy_copy_dir(src, dst, relative: float, seed: int = 1):
    """A copy of a model whose every decoder linear weight got Gaussian noise of the given relative size."""
    from bitplan.models import find_linears

    lm = load_model(str(src))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for info in find_linears(lm.model):
            w = lm.model.get_submodule(info.name).weight
            w.add_(torch.randn(w.shape, generator=g) * w.norm() * relative / w.numel() ** 0.5)
    lm.model.save_pretrained(dst)
    lm.tokenizer.save_pretrained(dst)
    return dst


def test_self_and_noisy(tiny_model_dir, tiny_text, tmp_path):
    same = evaluate(str(tiny_model_dir), str(tiny_model_dir), str(tiny_text), windows=3, seqlen=32, progress=False)
    assert abs(same.kl_mean) < 1e-6 and same.top1_agreement == 1.0 and same.tokens == 3 * 31
    noisy = noisy_copy_dir(tiny_model_dir, tmp_path / "noisy", 0.1)
    out = tmp_path / "r.json"
    r = evaluate(str(tiny_model_dir), str(noisy), str(tiny_text), windows=3, seqlen=32, json_out=out, progress=False)
    assert r.kl_mean > 0 and r.kl_max >= r.kl_p99 >= r.kl_median >= 0
    assert json.loads(out.read_text())["kl_mean"] == pytest.approx(r.kl_mean)
    # More noise, more divergence.
    louder = noisy_copy_dir(tiny_model_dir, tmp_path / "louder", 0.4)
    assert evaluate(str(tiny_model_dir), str(louder), str(tiny_text), windows=3, seqlen=32,
                    progress=False).kl_mean > r.kl_mean


def test_exclude_calibration_draws_only_untouched_windows(tiny_model_dir, tmp_path, monkeypatch):
    """On the calibration text, --exclude-calibration scores windows that share no token position with the
    candidate's calibration windows (found here by matching every window against the token stream)."""
    from bitplan.apply import apply_plan
    from bitplan.data import load_texts, token_stream, token_windows
    from bitplan.profile import profile_model
    from bitplan.solve import solve
    import bitplan.evaluate as ev

    text = tmp_path / "numbered.txt"   # numbered lines: every window is a unique slice, so matching finds it
    text.write_text(" ".join(f"Line {i} of the union." for i in range(900)))
    lm = load_model(str(tiny_model_dir))
    profile_model(lm, str(text), samples=60, seqlen=32, out_dir=tmp_path / "prof", noise_samples=0,
                  formats=["int4-g32"], judge_samples=0, progress=False)
    plan = solve(tmp_path / "prof", "5.5bpw")   # int4-g32 everywhere: 5.02 bpw with its scales and zeros
    plan.save(tmp_path / "plan.json")
    apply_plan(tmp_path / "plan.json", tmp_path / "q", model=lm, rounding="rtn", progress=False)
    stream = token_stream(lm.tokenizer, load_texts(str(text)))
    seen = []
    real = ev._logits
    monkeypatch.setattr(ev, "_logits", lambda m, w: seen.append(w) or real(m, w))

    def starts(windows, length):
        return [next(s for s in range(0, len(stream) - length + 1) if torch.equal(stream[s:s + length], w))
                for w in windows]

    r = evaluate(str(tiny_model_dir), str(tmp_path / "q"), str(text), windows=40, seqlen=24, seed=1,
                 exclude_calibration=True, cache=False, progress=False)
    calib = starts(token_windows(lm.tokenizer, str(text), 60, 32, seed=0), 32)
    scored = starts(seen[40:], 24)   # the candidate's calls (the reference runs every window first)
    assert r.excluded_spans == 60 and not r.warnings and len(set(scored)) == 40
    assert all(s + 24 <= c or c + 32 <= s for s in scored for c in calib)
    # without it the same call draws windows the calibration saw, and warns that the figure is in-sample
    seen.clear()
    r = evaluate(str(tiny_model_dir), str(tmp_path / "q"), str(text), windows=40, seqlen=24, seed=1,
                 cache=False, progress=False)
    assert r.warnings and any(not (s + 24 <= c or c + 32 <= s) for s in starts(seen[40:], 24) for c in calib)
    with pytest.raises(BitplanError, match="records no calibration"):
        evaluate(str(tiny_model_dir), str(tiny_model_dir), str(text), windows=2, seqlen=24,
                 exclude_calibration=True, progress=False)


def test_reference_logits_cache(tiny_model_dir, tiny_text, tmp_path, monkeypatch):
    """A second evaluation reads the reference logits from disk and gives the same figures."""
    noisy = noisy_copy_dir(tiny_model_dir, tmp_path / "noisy", 0.1)
    first = evaluate(str(tiny_model_dir), str(noisy), str(tiny_text), windows=2, seqlen=32, progress=False)
    calls, opened = [], []
    import bitplan.evaluate as ev

    real, real_open = ev._logits, ev.open_model
    monkeypatch.setattr(ev, "_logits", lambda m, w: calls.append(1) or real(m, w))
    monkeypatch.setattr(ev, "open_model", lambda spec, *a: opened.append(spec) or real_open(spec, *a))
    second = evaluate(str(tiny_model_dir), str(noisy), str(tiny_text), windows=2, seqlen=32, progress=False)
    assert len(calls) == 2  # the candidate's two windows only
    assert opened == [str(noisy)]   # the reference's identity came from its shards: it was never loaded
    assert second.kl_mean == pytest.approx(first.kl_mean, rel=1e-12)


def test_cache_cap_evicts_oldest(tmp_path):
    cache = LogitCache(tmp_path / "c", max_bytes=3 * 400)
    for i in range(5):
        cache.put(f"k{i}", torch.full((10, 10), float(i)))  # 400 bytes each (+ header)
    kept = sorted(p.stem for p in (tmp_path / "c").glob("*.safetensors"))
    assert "k4" in kept and "k0" not in kept and len(kept) <= 3
    assert torch.equal(cache.get("k4"), torch.full((10, 10), 4.0))
    assert cache.get("k0") is None


def run_cli(*args):
    code = "from bitplan.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_cli_table_and_json(tiny_model_dir, tiny_text, tmp_path):
    out = tmp_path / "e.json"
    r = run_cli("eval", "--reference", str(tiny_model_dir), "--candidate", str(tiny_model_dir), "--data", str(tiny_text),
                "--windows", "2", "--seqlen", "16", "--json", str(out), "--no-cache")
    assert r.returncode == 0, r.stderr
    assert "KL mean" in r.stdout and "top-1 agreement" in r.stdout
    assert json.loads(out.read_text())["top1_agreement"] == 1.0


def test_cli_bad_input(tiny_model_dir, tiny_text, tmp_path):
    """Each bad input ends in one clear error line, a non-zero exit and no traceback."""
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    tok = make_tokenizer()
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=len(tok))).save_pretrained(bert)
    tok.save_pretrained(bert)
    other = tmp_path / "other-tokenizer"
    tok2 = make_tokenizer(340)
    tiny_llama(len(tok2)).save_pretrained(other)
    tok2.save_pretrained(other)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    m, t = str(tiny_model_dir), str(tiny_text)
    cases = {
        "model not found": ["-r", "/no/such/dir", "-c", m, "-d", t],
        "no causal-LM head": ["-r", m, "-c", str(bert), "-d", t],
        "different tokenizers": ["-r", m, "-c", str(other), "-d", t],
        "holds no text": ["-r", m, "-c", m, "-d", str(empty)],
        "text file not found": ["-r", m, "-c", m, "-d", str(tmp_path / "missing.txt")],
        "longer than the model's context": ["-r", m, "-c", m, "-d", t, "--seqlen", "4096"],
        "must be positive": ["-r", m, "-c", m, "-d", t, "--windows", "0"],
    }
    for message, args in cases.items():
        r = run_cli("eval", *args, "--no-cache")
        assert r.returncode != 0, message
        assert message in r.stderr, (message, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 3, r.stderr


def test_the_json_path_is_checked_before_any_model_loads(tmp_path, monkeypatch):
    """evaluate(json_out=...) from Python refuses an unwritable path first, as `bitplan eval --json` does."""
    import bitplan.evaluate as ev

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the output path was checked")

    monkeypatch.setattr(ev, "open_model", no_loading)
    (tmp_path / "text.txt").write_text("some text " * 200)
    with pytest.raises(BitplanError, match="not a folder"):
        ev.evaluate("ref", "cand", str(tmp_path / "text.txt"), json_out="/dev/null/eval.json")
    (tmp_path / "taken").mkdir()
    with pytest.raises(BitplanError, match="is a folder"):
        ev.evaluate("ref", "cand", str(tmp_path / "text.txt"), json_out=tmp_path / "taken")
