"""`bitplan export gguf | tensor-types | imatrix | compressed-tensors`: files for llama.cpp from a checkpoint, a plan
or a profile, and a checkpoint as a compressed-tensors folder for vLLM."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from . import _Command, _Group, app, console, print_table

export_app = typer.Typer(cls=_Group, name="export", no_args_is_help=True, add_completion=False,
                         help="Files for llama.cpp (a checkpoint as GGUF, a plan as a tensor-type list, a profile "
                              "as an imatrix) and vLLM (a checkpoint as a compressed-tensors folder).")
app.add_typer(export_app, name="export")


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


@export_app.command("gguf", cls=_Command)
def gguf_command(
    checkpoint: Path = typer.Argument(..., help="checkpoint folder from `bitplan apply` (ggml formats)"),
    out: Path = typer.Option(..., "--out", "-o", help="GGUF file to write"),
    embedding_type: str = typer.Option("q8_0", "--embedding-type",
                                       help="type of a float token embedding: f32, f16, bf16, q8_0, q5_1, q5_0, "
                                            "q4_1 or q4_0 (a planned ggml embedding keeps its blocks)"),
    output_type: str = typer.Option("q8_0", "--output-type", help="type of a float untied head (same choices)"),
    other_type: str = typer.Option("f16", "--other-type", help="type of the other float matrices, fp16 modules "
                                   "included (same choices)"),
) -> None:
    """Write a checkpoint as one GGUF file that llama.cpp (`llama-cli -m`) and transformers run; ggml blocks are
    copied unchanged."""
    from ..export import export_gguf
    from ..export.gguf_export import type_name

    result = export_gguf(checkpoint, out, embedding_type=embedding_type, output_type=output_type,
                         other_type=other_type)
    table = Table(title="tensors by type")
    table.add_column("type", no_wrap=True)
    table.add_column("tensors", justify="right")
    table.add_column("bytes", justify="right")
    by_type: dict[str, int] = {}
    for t in result.tensors:
        by_type[type_name(t.type)] = by_type.get(type_name(t.type), 0) + t.nbytes
    for name, count in result.type_counts().items():
        table.add_row(name, str(count), _size(by_type[name]))
    print_table(table)
    console.print(f"{result.path} ({result.arch}, pre-tokenizer {result.pre_tokenizer}): "
                  f"{_size(result.file_bytes)}, {result.file_bpw:.3f} bits per weight; block linears "
                  f"{result.block_linear_bpw:.3f} bits per weight", highlight=False)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)


@export_app.command("tensor-types", cls=_Command)
def tensor_types_command(
    plan: Path = typer.Argument(..., help="plan.json from `bitplan solve` (ggml formats)"),
    out: Path = typer.Option(..., "--out", "-o", help="file for llama-quantize --tensor-type-file"),
    map_formats: str = typer.Option("none", "--map", help="none (refuse layers in formats without a ggml type) or "
                                    "nearest (the ggml type of the nearest bits per weight)"),
) -> None:
    """Write a plan as llama-quantize's tensor-type file: one anchored `^NAME$=type` per tensor."""
    from ..export import export_tensor_types

    result = export_tensor_types(plan, out, map_formats=map_formats)
    counts: dict[str, int] = {}
    for t in result.types.values():
        counts[t] = counts.get(t, 0) + 1
    console.print(f"{result.path}: {len(result.lines)} tensors ("
                  + ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1])) + ")",
                  highlight=False)


@export_app.command("imatrix", cls=_Command)
def imatrix_command(
    profile: Path = typer.Argument(..., help="profile folder with hessians/ from `bitplan profile`"),
    out: Path = typer.Option(..., "--out", "-o", help="imatrix GGUF file to write (for llama-quantize --imatrix)"),
) -> None:
    """Write the profile's input second moments (Σx² per input column) in llama.cpp's GGUF imatrix format."""
    from ..export import export_imatrix

    result = export_imatrix(profile, out)
    console.print(f"{result.path}: {result.entries} tensors, {result.tokens} tokens "
                  f"({result.chunk_count} chunks of {result.chunk_size})", highlight=False)


@export_app.command("compressed-tensors", cls=_Command)
def compressed_tensors_command(
    checkpoint: Path = typer.Argument(..., help="checkpoint folder from `bitplan apply` (a plan solved with "
                                      "--runtime vllm)"),
    out: Path = typer.Option(..., "--out", "-o", help="folder to write (new or empty)"),
) -> None:
    """Write a checkpoint as a compressed-tensors folder (pack-quantized) that vLLM serves and transformers loads;
    the integer codes are repacked, not requantized."""
    from ..export import export_compressed_tensors

    result = export_compressed_tensors(checkpoint, out)
    table = Table(title=f"compressed-tensors {result.version} config groups")
    table.add_column("scheme", no_wrap=True)
    table.add_column("bits", justify="right")
    table.add_column("group", justify="right")
    table.add_column("zero point")
    table.add_column("layers", justify="right")
    for name, args in result.scheme_args().items():
        table.add_row(name, str(args["num_bits"]), str(args["group_size"]),
                      "no" if args["symmetric"] else "integer", str(len(result.schemes[name])))
    table.add_row("fp16 (ignore)", "16", "", "", str(len(result.ignored)))
    print_table(table)
    console.print(f"{result.path}: {len(result.shards)} safetensors file(s), {_size(result.file_bytes)}",
                  highlight=False)
    console.print(f"serve it with: vllm serve {result.path} --dtype float16", highlight=False)
