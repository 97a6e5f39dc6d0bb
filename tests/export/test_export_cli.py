"""`bitplan export ...` through the command line: the table and totals it prints, and bad input as one line with
exit code 2."""
from __future__ import annotations


import gguf
import pytest


from tests.export.test_gguf import build




def test_export_gguf_prints_types_and_sizes(tmp_path, tiny_tokenizer, monkeypatch, capsys, cli):
    folder, ckpt, formats = build(tmp_path, tiny_tokenizer, False, mix=["q4_K", "q8_0"])
    path = tmp_path / "model.gguf"
    code, out, err = cli("export", "gguf", str(ckpt), "-o", str(path), "--other-type", "f32")
    assert code == 0, err
    reader = gguf.GGUFReader(path)
    n_q4k = sum(t.tensor_type == gguf.GGMLQuantizationType.Q4_K for t in reader.tensors)
    assert n_q4k == 7   # every other of the 14 linears
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]
    assert ["q4_K", "7"] in [r[:2] for r in rows], out
    linears = [t for t in reader.tensors if t.name.startswith("blk.") and "norm" not in t.name]
    bpw = sum(int(t.n_bytes) for t in linears) * 8 / sum(int(t.n_elements) for t in linears)
    text = " ".join(out.split())
    assert f"{path.stat().st_size / 1e6:.1f} MB" in text and f"block linears {bpw:.3f} bits per weight" in text


@pytest.mark.parametrize("args,message", [
    (["export", "imatrix", "{tmp}"], "has no hessians/"),
    (["export", "gguf", "{tmp}", "--embedding-type", "q3_K"], "--embedding-type q3_K"),
    (["export", "tensor-types", "{tmp}/plan.json"], "plan not found"),
])
def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys, args, message, cli):
    args = [a.format(tmp=tmp_path) for a in args]
    code, out, err = cli(*args, "-o", str(tmp_path / "x.out"))
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2   # one line, wrapped at most once
    assert not (tmp_path / "x.out").exists()
