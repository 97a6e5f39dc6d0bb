"""The default model exported to GGUF (model tier): its tokenizer metadata is the installed source GGUF's, and
`bitplan eval` of the file equals that of the checkpoint. An optional tier runs the file in llama.cpp itself."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from bitplan.apply import apply_formats, load_quantized
from bitplan.evaluate import evaluate
from bitplan.export import export_gguf
from bitplan.models import BUILTIN_MODELS, find_linears, load_model

pytestmark = pytest.mark.model
MIX = ["q4_0", "q8_0", "q5_1", "q4_1", "q5_0", "iq4_nl", "q4_0"]   # 576-wide rows: 32-weight blocks


@pytest.fixture
def exported(smollm2, tmp_path):
    formats = {info.name: MIX[i % len(MIX)] for i, info in enumerate(find_linears(smollm2.model))}
    ckpt = tmp_path / "quantized"
    apply_formats(smollm2, formats, ckpt, rounding="rtn", progress=False)
    path = tmp_path / "model.gguf"
    export_gguf(ckpt, path, embedding_type="f16", progress=False)
    return ckpt, path


def source_gguf() -> Path:
    info = BUILTIN_MODELS["smollm2-135m"]
    spec = importlib.util.find_spec(info.module)
    return Path(spec.submodule_search_locations[0]) / info.gguf_file


def tokenizer_fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def test_tokenizer_metadata_and_eval_equal(exported, tmp_path, monkeypatch):
    ckpt, path = exported
    ours, source = tokenizer_fields(path), tokenizer_fields(source_gguf())
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.chat_template"):
        assert ours.get(key) == source[key], key
    assert ours["tokenizer.ggml.pre"] == "smollm"

    reference = load_model("smollm2-135m")
    # the GGUF is converted into the cache once per file: a temporary cache, not the shared one
    monkeypatch.setenv("BITPLAN_CACHE", str(tmp_path / "cache"))
    kw = dict(data="wikitext2", windows=2, seqlen=128, progress=False, cache=False)
    a = evaluate(reference, str(path), **kw)
    b = evaluate(reference, str(ckpt), **kw)
    assert a.kl_mean > 0 and abs(a.kl_mean - b.kl_mean) <= 1e-4 * b.kl_mean
    assert a.top1_agreement == b.top1_agreement
    assert abs(a.ppl_candidate - b.ppl_candidate) <= 1e-4 * b.ppl_candidate


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama_cpp (llama-cpp-python) not installed")
def test_llama_cpp_runs_the_file(exported):
    import llama_cpp

    ckpt, path = exported
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, verbose=False)
    ids = list(range(100, 132))
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)], dtype=np.float64)
    with torch.inference_mode():
        ours = load_quantized(ckpt).model(torch.tensor([ids])).logits[0].double().numpy()
    assert np.abs(theirs - ours).max() <= 0.02 * np.abs(ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9
