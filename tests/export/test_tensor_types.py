"""`bitplan export tensor-types`: every line parses as llama-quantize reads it and picks out exactly the tensor of
the exported GGUF that holds that layer, in the plan's type."""
from __future__ import annotations

import json
import re

import gguf
import pytest

from bitplan.errors import BitplanError
from bitplan.export import export_gguf, export_tensor_types

from tests.export.test_gguf import build


def write_plan(path, formats, shapes):
    layers = [{"name": n, "format": f, "shape": list(shapes[n]), "block": int(n.split(".")[2]), "kind": "linear"}
              for n, f in formats.items()]
    path.write_text(json.dumps({"schema": "bitplan.plan", "version": 1, "profile": {}, "budget": {},
                                "objective": "noise", "extras": {"bits": 0}, "layers": layers}))
    return path


def parse_like_llama_quantize(text: str) -> list[tuple[str, gguf.GGMLQuantizationType]]:
    """Tokens split on whitespace; each at its first '='; the name lower-cased; the type matched without case
    against ggml's type names."""
    names = {t.name.lower(): t for t in gguf.GGMLQuantizationType}
    out = []
    for token in text.split():
        pattern, sep, type_name = token.partition("=")
        assert sep and pattern and type_name, token
        out.append((pattern.lower(), names[type_name.lower()]))
    return out


def test_lines_select_each_tensor_of_the_gguf_once(tmp_path, tiny_tokenizer):
    folder, ckpt, formats = build(tmp_path, tiny_tokenizer, False)
    gguf_path = tmp_path / "model.gguf"
    export_gguf(ckpt, gguf_path, progress=False)
    reader = gguf.GGUFReader(gguf_path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    from bitplan.models import find_linears, load_model

    shapes = {i.name: (i.out_features, i.in_features) for i in find_linears(load_model(str(folder)).model)}
    out = tmp_path / "types.txt"
    result = export_tensor_types(write_plan(tmp_path / "plan.json", formats, shapes), out)
    text = out.read_text()
    assert text.endswith("\n") and all(line and not re.search(r"\s", line) for line in text.splitlines())
    rules = parse_like_llama_quantize(text)
    assert len(rules) == len(formats) == len(result.lines)
    covered = set()
    for pattern, qtype in rules:
        assert pattern.startswith("^") and pattern.endswith("$")
        hits = [name for name in types if re.search(pattern, name)]
        assert len(hits) == 1, pattern
        assert types[hits[0]] == qtype, pattern   # the exported file stores that tensor in that type
        covered.add(hits[0])
    assert covered == {n for n in types if n.startswith("blk.") and "norm" not in n}


def test_non_ggml_formats_are_refused(tmp_path):
    formats = {"model.layers.0.self_attn.q_proj": "q4_0", "model.layers.0.self_attn.k_proj": "int4-g32",
               "model.layers.1.mlp.down_proj": "higgs-p2-n256-g64"}
    shapes = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.self_attn.k_proj": (32, 64),
              "model.layers.1.mlp.down_proj": (64, 128)}
    out = tmp_path / "types.txt"
    with pytest.raises(BitplanError, match=r"^2 layer\(s\).*k_proj \(int4-g32\).*down_proj.*--formats ggml"):
        export_tensor_types(write_plan(tmp_path / "plan.json", formats, shapes), out)
    assert not out.exists()


def test_map_nearest_picks_the_ggml_type_of_the_nearest_storage(tmp_path):
    from bitplan.formats import GGML_NAMES, get_format

    formats = {"model.layers.0.self_attn.q_proj": "int4-g32", "model.layers.0.self_attn.k_proj": "int3-g128",
               "model.layers.1.mlp.down_proj": "int2-g64", "model.layers.1.mlp.up_proj": "q6_K"}
    shapes = {"model.layers.0.self_attn.q_proj": (576, 576), "model.layers.0.self_attn.k_proj": (192, 576),
              "model.layers.1.mlp.down_proj": (576, 1536), "model.layers.1.mlp.up_proj": (1536, 512)}
    out = tmp_path / "types.txt"
    result = export_tensor_types(write_plan(tmp_path / "plan.json", formats, shapes), out, map_formats="nearest")
    chosen = dict(parse_like_llama_quantize(out.read_text()))
    assert len(chosen) == 4 and chosen[r"^blk\.1\.ffn_up\.weight$"] == gguf.GGMLQuantizationType.Q6_K
    for name, gname in (("model.layers.0.self_attn.q_proj", r"^blk\.0\.attn_q\.weight$"),
                        ("model.layers.0.self_attn.k_proj", r"^blk\.0\.attn_k\.weight$"),
                        ("model.layers.1.mlp.down_proj", r"^blk\.1\.ffn_down\.weight$")):
        m, n = shapes[name]
        want = get_format(formats[name]).storage_bits(m, n)
        # brute force over every ggml type whose blocks fit the rows: the chosen one is at the least distance
        dist = {g: abs(get_format(g).storage_bits(m, n) - want)
                for g in GGML_NAMES if n % get_format(g).block_size == 0}
        best = min(dist.values())
        assert dist[next(g for g in dist if gguf.GGMLQuantizationType[g.upper()] == chosen[gname])] == best
    assert chosen[r"^blk\.1\.ffn_down\.weight$"] == gguf.GGMLQuantizationType.Q2_K   # 1536 wide: K-types apply
    assert chosen[r"^blk\.0\.attn_k\.weight$"] != gguf.GGMLQuantizationType.Q3_K     # 576 wide: they do not
    assert result.types["blk.0.attn_q.weight"] == "q4_1"
