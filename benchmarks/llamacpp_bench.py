"""bitplan's GGUF files against llama.cpp's own mixes, at equal whole-file size, judged on the same held-out windows.

    python benchmarks/llamacpp_bench.py --llama-cpp PATH --profile PROFILE_DIR [--model smollm2-135m]
        [--out runs/llamacpp] [--mixes Q4_K_M,Q3_K_M,IQ4_XS,IQ3_S,Q4_0] [--windows 32 --seqlen 512]

PATH is a llama.cpp source tree whose tools are built (`cmake -B build && cmake --build build --target
llama-quantize`; the binaries are looked up in PATH/build/bin). For each mix:

1. llama.cpp: the model converted to an f32 GGUF with the tree's own `convert_hf_to_gguf.py`, then
   `llama-quantize --imatrix` to the mix; the importance matrix is `bitplan export imatrix PROFILE`, i.e. the
   input second moments of the very calibration tokens the profile measured (Q4_0 is made without one, as
   llama.cpp users make it);
2. bitplan: `solve PROFILE --budget <that file's bytes>B --formats ggml` (the whole file: embedding included),
   `apply` (the plan's rounding), `export gguf`;
3. both files judged by `bitplan eval --candidate FILE.gguf` on the same WikiText-2 windows (transformers
   dequantizes GGUF exactly as llama.cpp does).

Every step's output is kept in --out and a finished step is skipped when the script runs again, so a killed run
resumes. The table (and results.json) give each file's size, its block-linear bits per weight, its mean KL and
the ratio bitplan / llama.cpp.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

MIXES = ("Q4_K_M", "Q3_K_M", "IQ4_XS", "IQ3_S", "Q4_0")
NO_IMATRIX = {"Q4_0"}
PLAN_METADATA_ALLOWANCE = 256 * 1024  # bitplan's own GGUF metadata: the plan's JSON (≈ 100 KB for 30 blocks)


def run(cmd: list[str], console: Console, env: dict | None = None) -> str:
    console.print(f"[dim]$ {' '.join(cmd)}[/dim]")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}")
    return done.stdout + done.stderr


def llama_commit(tree: Path, quantize: Path) -> str:
    """The tree's git commit where it is a checkout, else what llama-quantize reports about its build (a tree
    without git history, such as the copy vendored in llama-cpp-python's sdist, reports none: pass --commit)."""
    try:
        out = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except OSError:
        pass
    out = subprocess.run([str(quantize), "--version"], capture_output=True, text=True)
    m = re.search(r"version: (\S+) \((\w+)\)", out.stdout + out.stderr)
    return f"build {m.group(1)} ({m.group(2)})" if m else "unknown"


def gguf_summary(path: Path) -> dict:
    """File size, block-linear bits per weight (tensors under blk.*, 2-D) and bytes of each tensor type."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    block_bytes = block_params = 0
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + int(t.n_bytes)
        if t.name.startswith("blk.") and len(t.shape) == 2:
            block_bytes += int(t.n_bytes)
            block_params += int(t.n_elements)
    size = path.stat().st_size
    return {"bytes": size, "overhead": size - sum(types.values()),
            "block_bpw": 8 * block_bytes / max(block_params, 1), "types": types}


def evaluate(candidate: Path, model: str, out: Path, args, console: Console) -> dict:
    if not out.is_file():
        run(["bitplan", "eval", "--reference", model, "--candidate", str(candidate), "--windows", str(args.windows),
             "--seqlen", str(args.seqlen), "--json", str(out)], console)
    return json.loads(out.read_text())


def mean_kl(result: dict) -> float:
    """The mean per-token KL(reference ‖ candidate) from `bitplan eval --json`."""
    return float(result["kl_mean"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", required=True, type=Path, help="llama.cpp source tree with build/bin tools")
    ap.add_argument("--profile", required=True, type=Path, help="bitplan profile measured with --formats ggml")
    ap.add_argument("--model", default="smollm2-135m", help="the model the profile is of")
    ap.add_argument("--out", default=Path("runs/llamacpp"), type=Path, help="working folder (resumable)")
    ap.add_argument("--commit", default=None, help="the llama.cpp commit, when the tree is not a git checkout")
    ap.add_argument("--mixes", default=",".join(MIXES), help="llama.cpp ftypes, comma-separated")
    ap.add_argument("--windows", type=int, default=32, help="evaluation windows")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per evaluation window")
    ap.add_argument("--imatrix", choices=("profile", "llama"), default="profile",
                    help="llama.cpp's importance matrix: the profile's calibration second moments (bitplan export "
                         "imatrix) or llama-imatrix run on the profile's calibration text (64K tokens)")
    ap.add_argument("--json", type=Path, default=None, help="where the results go (default OUT/results.json)")
    ap.add_argument("--rounding", default=None, help="bitplan apply --rounding (default: the plan's)")
    ap.add_argument("--fp16-embedding", type=Path, default=None, metavar="PROFILE",
                    help="also solve each budget with the embedding kept fp16 (--scope blocks), from PROFILE's "
                         "formats (bitplan's rotated ones: no ggml mix fits such a budget), rounded with --profile's "
                         "factors; judged as a checkpoint")
    args = ap.parse_args(argv)
    console = Console()

    from bitplan.models import resolve_model_path

    tree = args.llama_cpp.resolve()
    quantize = tree / "build" / "bin" / "llama-quantize"
    if not quantize.is_file():
        raise SystemExit(f"{quantize} not found: build llama.cpp first (cmake -B build && cmake --build build "
                         "--target llama-quantize)")
    args.out.mkdir(parents=True, exist_ok=True)
    commit = args.commit or llama_commit(tree, quantize)
    console.print(f"llama.cpp {commit}")

    f32 = args.out / "model-f32.gguf"
    if not f32.is_file():
        env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
        run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(resolve_model_path(args.model)), "--outtype",
             "f32", "--outfile", str(f32)], console, env=env)
    imatrix = args.out / ("imatrix.gguf" if args.imatrix == "profile" else "imatrix-llama.gguf")
    if not imatrix.is_file() and args.imatrix == "profile":
        run(["bitplan", "export", "imatrix", str(args.profile), "-o", str(imatrix)], console)
    elif not imatrix.is_file():  # llama.cpp's own tool on the calibration text, 64K tokens in 512-token chunks
        from bitplan.data import load_texts

        calib = json.loads((args.profile / "profile.json").read_text())["calibration"]["source"]
        text = args.out / "calibration.txt"
        text.write_text("\n\n".join(load_texts(calib)))
        run([str(tree / "build" / "bin" / "llama-imatrix"), "-m", str(f32), "-f", str(text), "-c", "512",
             "--chunks", "128", "-o", str(imatrix)], console)
    tag = "" if args.imatrix == "profile" else "-llama-imatrix"
    reference = evaluate(f32, args.model, args.out / "f32.eval.json", args, console)

    rows = []
    for mix in [m.strip() for m in args.mixes.split(",") if m.strip()]:
        peer = args.out / f"llamacpp-{mix}{tag}.gguf"
        if not peer.is_file():
            extra = [] if mix in NO_IMATRIX else ["--imatrix", str(imatrix)]
            run([str(quantize), *extra, str(f32), str(peer), mix], console)
        peer_info = gguf_summary(peer)
        peer_kl = mean_kl(evaluate(peer, args.model, args.out / f"llamacpp-{mix}{tag}.eval.json", args, console))

        stem = args.out / f"bitplan-{mix}"
        ours = stem.with_suffix(".gguf")
        # The solver counts tensors (a safetensors checkpoint's); a GGUF adds the tokenizer and metadata, which
        # llama.cpp's file carries too. Budget the tensors at the peer's file size less that overhead, and if the
        # exported file still comes out larger, take the excess off and solve again.
        budget = peer_info["bytes"] - peer_info["overhead"] - PLAN_METADATA_ALLOWANCE
        for attempt in range(3):
            if ours.is_file() and ours.stat().st_size <= peer_info["bytes"]:
                break
            plan, ckpt = Path(f"{stem}.{attempt}.plan.json"), Path(f"{stem}.{attempt}.ckpt")
            if not plan.is_file():
                run(["bitplan", "solve", str(args.profile), "--budget", f"{budget}B", "--formats", "ggml",
                     "-o", str(plan)], console)
            if not (ckpt / "config.json").is_file():
                run(["bitplan", "apply", str(plan), "-o", str(ckpt), "--overwrite",
                     *(["--rounding", args.rounding] if args.rounding else [])], console)
            run(["bitplan", "export", "gguf", str(ckpt), "-o", str(ours)], console)
            budget -= max(ours.stat().st_size - peer_info["bytes"], 0) + 4096
        else:
            raise SystemExit(f"{ours} stays larger than {peer} after three budgets")
        our_info = gguf_summary(ours)
        our_kl = mean_kl(evaluate(ours, args.model, args.out / f"bitplan-{mix}.eval.json", args, console))
        row = {"mix": mix, "imatrix": mix not in NO_IMATRIX, "llamacpp": {**peer_info, "kl": peer_kl},
               "bitplan": {**our_info, "kl": our_kl, "budget_bytes": budget}, "ratio": our_kl / peer_kl}
        if args.fp16_embedding:  # the same budget with the embedding kept fp16: bitplan's own formats, a checkpoint
            plan, ckpt = Path(f"{stem}.fp16emb.plan.json"), Path(f"{stem}.fp16emb.ckpt")
            if not plan.is_file():
                run(["bitplan", "solve", str(args.fp16_embedding), "--budget", f"{budget}B", "--scope", "blocks",
                     "-o", str(plan)], console)
            if not (ckpt / "config.json").is_file():
                run(["bitplan", "apply", str(plan), "--profile", str(args.profile), "-o", str(ckpt), "--overwrite",
                     *(["--rounding", args.rounding] if args.rounding else [])], console)
            kl = mean_kl(evaluate(ckpt, args.model, args.out / f"bitplan-{mix}.fp16emb.eval.json", args, console))
            row["fp16_embedding"] = {"kl": kl, "block_bpw": json.loads(plan.read_text())["totals"]["storage_bpw"],
                                     "bytes": (ckpt / "model.safetensors").stat().st_size}
        rows.append(row)

    table = Table(title=f"bitplan vs llama.cpp {commit}: {args.model}, {args.windows} × {args.seqlen} WikiText-2 tokens")
    cols = ["llama.cpp mix", "file MB", "block bpw", "KL", "bitplan file MB", "block bpw", "KL", "bitplan / llama.cpp"]
    for col in cols + (["bitplan, fp16 embedding: KL"] if args.fp16_embedding else []):
        table.add_column(col, justify="right")
    for r in rows:
        p, b = r["llamacpp"], r["bitplan"]
        table.add_row(r["mix"] + (" + imatrix" if r["imatrix"] else ""), f"{p['bytes'] / 1e6:.1f}",
                      f"{p['block_bpw']:.2f}", f"{p['kl']:.4f}", f"{b['bytes'] / 1e6:.1f}", f"{b['block_bpw']:.2f}",
                      f"{b['kl']:.4f}", f"{r['ratio']:.2f}",
                      *([f"{r['fp16_embedding']['kl']:.4f}"] if "fp16_embedding" in r else []))
    console.print(table)
    result = {"llama_cpp": commit, "model": args.model, "profile": str(args.profile), "windows": args.windows,
              "seqlen": args.seqlen, "f32_kl": mean_kl(reference), "rows": rows}
    target = args.json or args.out / "results.json"
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(target)


if __name__ == "__main__":
    main()
