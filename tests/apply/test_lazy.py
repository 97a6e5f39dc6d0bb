"""apply reading a model from its safetensors shards one tensor at a time: the same checkpoint bytes as the model
loaded whole, the same identity hash, one tensor in memory at a time, resumable; other files load whole."""
from __future__ import annotations

import weakref

import pytest
import torch

from bitplan.apply import apply_formats
from bitplan.apply.source import open_source, skeleton
from bitplan.errors import BitplanError
from bitplan.models import find_linears, load_model, weights_sha256
from bitplan.profile import profile_model
from bitplan.shards import Shards, shards_sha256

from tests.conftest import tiny_llama

LINEAR_FORMATS = ["int4-g32", "higgs-p2-n64-g64", "fp16", "int3-g64", "higgs-p1-n16-g64"]
# (tied head, max_shard_size or None for one file, stored dtype)
VOCAB = 320   # the tokenizer's 300 rounded up to whole 16-row tiles, so that LDLQ can round the embedding
MODELS = {"sharded": (True, "40KB", torch.float32), "single": (False, None, torch.bfloat16)}


def save_model(folder, tokenizer, tie: bool, shard: str | None, dtype: torch.dtype):
    model = tiny_llama(VOCAB)
    if tie:
        from transformers import LlamaForCausalLM

        model.config.tie_word_embeddings = True
        tied = LlamaForCausalLM(model.config).eval()
        tied.load_state_dict({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, strict=False)
        tied.tie_weights()
        model = tied
    model = model.to(dtype)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save_pretrained(folder)
    return folder


def plan_formats(model, tie: bool) -> dict[str, str]:
    names = [info.name for info in find_linears(model)]
    formats = {name: LINEAR_FORMATS[i % len(LINEAR_FORMATS)] for i, name in enumerate(names)}
    # tied: the shared matrix quantized once under the embedding's name; untied: the head quantized, the
    # embedding planned fp16 (kept as the model's own fp16 tensor)
    formats.update({"model.embed_tokens": "int4-g32"} if tie else {"lm_head": "int4-g32", "model.embed_tokens": "fp16"})
    return formats


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    """Per kind: (model folder, its profile with factors, a plan's formats)."""
    root = tmp_path_factory.mktemp("lazy")
    out = {}
    for kind, (tie, shard, dtype) in MODELS.items():
        folder = save_model(root / kind, tiny_tokenizer, tie, shard, dtype)
        lm = load_model(str(folder))
        windows = torch.randint(0, len(lm.tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
        profile_model(lm, windows, out_dir=root / f"{kind}-profile", noise_samples=0, formats=["int4-g32"],
                      judge_samples=0, progress=False)
        out[kind] = (folder, root / f"{kind}-profile", plan_formats(lm.model, tie))
    return out


def folder_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_streamed_file_has_save_files_bytes(tmp_path):
    """save_streamed writes what safetensors' save_file writes, for every dtype, a scalar, an empty tensor, and
    tensors given in blocks of rows."""
    import hashlib

    from safetensors.torch import save_file

    from bitplan.apply.stream import Entry, save_streamed

    g = torch.Generator().manual_seed(0)
    tensors = {"scalar": torch.tensor(3.0), "empty": torch.zeros(0, 4)}
    for i, dtype in enumerate([torch.bool, torch.uint8, torch.int8, torch.float8_e5m2, torch.float8_e4m3fn,
                               torch.int16, torch.uint16, torch.float16, torch.bfloat16, torch.int32, torch.uint32,
                               torch.float32, torch.float64, torch.int64, torch.uint64]):
        for name in ("zz", "a.b", "m"):
            x = torch.randn(5, i + 1, generator=g) * 10
            tensors[f"{name}{i}"] = x.to(dtype) if dtype.is_floating_point else x.abs().to(torch.int64).to(dtype)
    save_file(tensors, str(tmp_path / "a"), metadata={"format": "pt"})
    entries = [Entry(k, t.dtype, tuple(t.shape), (lambda t=t: t) if t.dim() < 2 else (lambda t=t: iter(t.split(2))))
               for k, t in tensors.items()]
    digest = save_streamed(entries, tmp_path / "b", {"format": "pt"})
    data = (tmp_path / "a").read_bytes()
    assert (tmp_path / "b").read_bytes() == data and digest == hashlib.sha256(data).hexdigest()


def test_the_fixture_models_are_stored_as_intended(models):
    sharded, single = models["sharded"][0], models["single"][0]
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 3
    assert not (single / "model.safetensors.index.json").exists() and (single / "model.safetensors").is_file()
    assert Shards.open(single).tensors["model.norm.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("rounding", ["yaqa", "rtn"])
def test_lazy_checkpoint_has_the_bytes_of_the_loaded_model(models, kind, rounding, tmp_path, monkeypatch):
    """Every file of the checkpoint, byte for byte, whether apply loads the model whole (save_file of a dict of
    tensors) or reads it from the shards (streamed tensor by tensor)."""
    import bitplan.apply.source as source
    import bitplan.shards as shards

    folder, profile, formats = models[kind]
    whole = apply_formats(str(folder), formats, tmp_path / "whole", rounding=rounding, profile_dir=profile,
                          lazy=False, progress=False, workers=1)

    def no_whole_model(*args, **kwargs):
        raise AssertionError("the lazy path loaded the whole model")

    monkeypatch.setattr(source, "load_model", no_whole_model)
    monkeypatch.setattr(shards, "CHUNK_BYTES", 1000)   # large tensors hashed and written in blocks of rows
    lazy = apply_formats(str(folder), formats, tmp_path / "lazy", rounding=rounding, profile_dir=profile,
                         progress=False)
    assert lazy.stats == whole.stats
    assert folder_bytes(tmp_path / "lazy") == folder_bytes(tmp_path / "whole")
    # the checkpoint rounded what the plan asked: a yaqa layer says so (an rtn one has no proxy)
    if rounding == "yaqa":
        assert any(s.get("rounding") == "yaqa" and s["proxy"] < s["proxy_rtn"] for s in lazy.stats.values())


@pytest.mark.parametrize("kind", list(MODELS))
def test_shard_hash_is_the_loaded_models_hash(models, kind):
    """weights_sha256 from the shards, one tensor at a time, equals it of the model loaded in float32 and, for the
    bf16 model, loaded in bf16 (hashed as the float32 upcast)."""
    folder = models[kind][0]
    from_shards = shards_sha256(skeleton(folder, str(folder)), Shards.open(folder))
    assert from_shards == weights_sha256(load_model(str(folder)).model)
    if MODELS[kind][2] == torch.bfloat16:
        assert from_shards == weights_sha256(load_model(str(folder), dtype=torch.bfloat16).model)
    assert open_source(str(folder)).weights_sha256 == from_shards


def test_a_changed_weight_changes_the_shard_hash(models, tmp_path, tiny_tokenizer):
    folder = models["single"][0]
    lm = load_model(str(folder))
    with torch.no_grad():
        lm.model.model.layers[1].mlp.down_proj.weight[3, 5] += 0.5
    lm.model.to(torch.bfloat16).save_pretrained(tmp_path / "changed")
    changed = shards_sha256(skeleton(tmp_path / "changed", "changed"), Shards.open(tmp_path / "changed"))
    assert changed != shards_sha256(skeleton(folder, "single"), Shards.open(folder))
    tiny_tokenizer.save_pretrained(tmp_path / "changed")
    assert changed == weights_sha256(load_model(str(tmp_path / "changed")).model)


def test_one_tensor_of_the_model_in_memory_at_a_time(models, tmp_path, monkeypatch):
    """With one worker, no tensor (or block of rows) read from the shards is alive when the next is read (hashing,
    rounding, and writing the checkpoint alike), and the whole model is never built."""
    from transformers import AutoModelForCausalLM

    folder, profile, formats = models["sharded"]
    alive: list[tuple[str, weakref.ref]] = []
    reads: list[str] = []
    real_read = Shards.read

    def read(self, key, start, stop):
        held = [name for name, ref in alive if ref() is not None]
        assert not held, f"reading {key} while {held} is still in memory"
        t = real_read(self, key, start, stop)
        alive.append((key, weakref.ref(t)))
        reads.append((key, start))
        return t

    def no_model(*args, **kwargs):
        raise AssertionError("the whole model was built")

    monkeypatch.setattr(Shards, "read", read)
    monkeypatch.setattr("bitplan.shards.CHUNK_BYTES", 4096)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_model)
    apply_formats(str(folder), formats, tmp_path / "q", rounding="yaqa", profile_dir=profile, workers=1,
                  progress=False)
    # every planned weight was read whole for its rounding, and every tensor in blocks for the hash
    planned = {f"{n}.weight" for n in formats}
    assert all(reads.count((key, 0)) == 2 for key in planned)
    assert set(Shards.open(folder).tensors) <= {key for key, _ in reads}
    assert any(start > 0 for _, start in reads)


def test_a_killed_lazy_apply_resumes(models, tmp_path, monkeypatch):
    """Killed after three layers, the lazy run resumes from their part files and writes the checkpoint that an
    uninterrupted run of the loaded model writes."""
    import bitplan.apply.run as run

    folder, profile, formats = models["sharded"]
    calls: list[str] = []
    real = run.quantize_layer

    def dies_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "quantize_layer", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        apply_formats(str(folder), formats, tmp_path / "q", rounding="yaqa", profile_dir=profile, workers=1,
                      progress=False)
    assert len(list(run.job_dir(tmp_path / "q").glob("*.safetensors"))) == 3
    redone: list[str] = []
    monkeypatch.setattr(run, "quantize_layer", lambda *a, **k: redone.append(a[0]) or real(*a, **k))
    apply_formats(str(folder), formats, tmp_path / "q", rounding="yaqa", profile_dir=profile, progress=False)
    assert sorted(redone) == sorted(set(formats) - set(calls))
    assert not run.job_dir(tmp_path / "q").exists()
    monkeypatch.setattr(run, "quantize_layer", real)
    apply_formats(str(folder), formats, tmp_path / "fresh", rounding="yaqa", profile_dir=profile, lazy=False,
                  progress=False)
    assert folder_bytes(tmp_path / "q") == folder_bytes(tmp_path / "fresh")


def test_a_model_without_safetensors_is_loaded_whole(tmp_path, tiny_tokenizer, monkeypatch):
    """A pytorch_model.bin folder: a note, and the checkpoint the same model in safetensors gives lazily;
    lazy=True refuses it."""
    from safetensors.torch import load_file

    st_folder = save_model(tmp_path / "st", tiny_tokenizer, False, None, torch.float32)
    bin_folder = save_model(tmp_path / "bin", tiny_tokenizer, False, None, torch.float32)
    torch.save(load_file(str(bin_folder / "model.safetensors")), bin_folder / "pytorch_model.bin")
    (bin_folder / "model.safetensors").unlink()
    formats = plan_formats(load_model(str(st_folder)).model, tie=False)
    notes: list[str] = []
    import bitplan.apply.run as run

    monkeypatch.setattr(run, "_note", notes.append)
    apply_formats(str(bin_folder), formats, tmp_path / "from-bin", rounding="rtn")
    assert any("no safetensors" in n and "whole model" in n for n in notes)
    apply_formats(str(st_folder), formats, tmp_path / "from-st", rounding="rtn", lazy=True, progress=False)
    a, b = folder_bytes(tmp_path / "from-bin"), folder_bytes(tmp_path / "from-st")
    assert a["model.safetensors"] == b["model.safetensors"]
    with pytest.raises(BitplanError, match="one layer at a time"):
        apply_formats(str(bin_folder), formats, tmp_path / "refused", rounding="rtn", lazy=True, progress=False)


def test_dtype_is_the_dtype_the_weights_are_rounded_from(tmp_path, tiny_tokenizer):
    """--dtype bfloat16 on a float32 model packs each layer as the same model saved in bf16 packs in float32."""
    from safetensors.torch import load_file

    f32 = save_model(tmp_path / "f32", tiny_tokenizer, False, None, torch.float32)
    bf16 = save_model(tmp_path / "bf16", tiny_tokenizer, False, None, torch.bfloat16)
    formats = plan_formats(load_model(str(f32)).model, tie=False)
    apply_formats(str(f32), formats, tmp_path / "a", rounding="rtn", dtype="bfloat16", device="cpu", progress=False)
    apply_formats(str(bf16), formats, tmp_path / "b", rounding="rtn", dtype="float32", device="cpu", progress=False)
    apply_formats(str(f32), formats, tmp_path / "c", rounding="rtn", dtype="float32", device="cpu", progress=False)
    a, b, c = (load_file(str(tmp_path / x / "model.safetensors")) for x in "abc")
    packed = [k for k in a if any(k.startswith(f"{n}.") for n in formats if formats[n] != "fp16")]
    assert packed and all(torch.equal(a[k], b[k]) for k in packed)
    assert any(not torch.equal(a[k], c[k]) for k in packed)   # bf16 weights round differently from float32 ones


def test_an_unusable_device_fails_before_any_work(models, tmp_path):
    folder, _, formats = models["single"]
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(BitplanError, match="no CUDA device"):
        apply_formats(str(folder), formats, tmp_path / "q", rounding="rtn", device="cuda", progress=False)
    assert not (tmp_path / "q").exists()


def test_cli_device_and_dtype(models, tmp_path, monkeypatch, capsys):
    """`bitplan apply --device cpu --dtype bfloat16` writes what apply_plan(device="cpu", dtype="bfloat16")
    writes; a device torch cannot use exits 2 with one line."""
    import sys

    from bitplan.apply import apply_plan
    from bitplan.cli import main
    from bitplan.solve import solve

    folder, profile, _ = models["single"]
    solve(profile, "5.1bpw").save(tmp_path / "plan.json")

    def cli(*args) -> int:
        monkeypatch.setattr(sys, "argv", ["bitplan", "apply", str(tmp_path / "plan.json"), *map(str, args)])
        try:
            main()
        except SystemExit as e:
            return e.code or 0
        return 0

    assert cli("-o", tmp_path / "cli", "--rounding", "rtn", "--device", "cpu", "--dtype", "bfloat16") == 0
    apply_plan(tmp_path / "plan.json", tmp_path / "api", rounding="rtn", device="cpu", dtype="bfloat16",
               progress=False)
    assert folder_bytes(tmp_path / "cli") == folder_bytes(tmp_path / "api")
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert cli("-o", tmp_path / "gpu", "--rounding", "rtn", "--device", "cuda") == 2
        err = capsys.readouterr().err
        assert "no CUDA device" in err and "Traceback" not in err


@pytest.mark.architectures
@pytest.mark.parametrize("family", ["llama", "qwen2-qkv-bias-tied",
                                    "gemma3-scalar-buffer-scaled-embedding-tied-qk-norm-extra-norms-sliding-window",
                                    "phi3-fused-qkv_proj-fused-gate_up_proj",
                                    "gpt_neox-fused-query_key_value-biases-parallel-residual"])
def test_every_family_is_read_lazily_to_the_same_bytes(family, tiny_tokenizer, tmp_path, monkeypatch):
    """Tied heads, scalar buffers, fused projections, and a checkpoint whose keys transformers renames on load
    (GPT-NeoX's embed_out is lm_head): read from several shards, the checkpoint of the model loaded whole."""
    import bitplan.apply.source as source
    from tests.architectures.test_families import FAMILIES, build

    model_type, extra, _, _ = FAMILIES[family]
    folder = tmp_path / model_type
    build(model_type, extra, VOCAB).save_pretrained(folder, max_shard_size="60KB")
    tiny_tokenizer.save_pretrained(folder)
    lm = load_model(str(folder))
    formats = {info.name: "int4-g32" for info in find_linears(lm.model)}
    formats[next(n for n, m in lm.model.named_modules() if m is lm.model.get_input_embeddings())] = "int4-g32"
    apply_formats(lm, formats, tmp_path / "whole", rounding="rtn", progress=False)
    monkeypatch.setattr(source, "load_model", None)   # the lazy run must not load the model whole
    apply_formats(str(folder), formats, tmp_path / "lazy", rounding="rtn", lazy=True, progress=False)
    assert folder_bytes(tmp_path / "lazy") == folder_bytes(tmp_path / "whole")
