"""The resource plan of a profile or apply job, from the model's config.json alone (no weights are read).

Per process it forecasts peak host memory, peak device memory, the disk that hessians/ takes, the factor groups
and calibration passes, and each phase's time as a multiple of one plain forward+backward pass over the
calibration (sampled labels, frozen weights: what `benchmarks/profile_bench.py` times). Counts come from the
model's shapes and what each phase holds and computes:

- memory: the weights in their dtype; what autograd keeps per token in a forward+backward with frozen weights
  (norm inputs, q/k/v and attention output, the MLP's gate, activation and up) plus the inputs the factor hooks
  keep; `LOGIT_COPIES` vocab-wide float32 rows per token (logits, log-softmax, their gradients); the float64
  factor sums of one group (m² + 2n² per layer: H_O, H_I, Σxxᵀ); the coefficient phase's float64 n×n buffers;
  the format errors' per-weight buffers of the widest matrix (the embedding); apply's per-layer buffers;
- time: multiply-adds per phase (forward passes from each layer's block for noise injection, the factor Grams
  per token, the n³ Cholesky/triangular solves of the coefficients and of rounding), float64 work weighed by
  the device's float64 cost per flop, the format errors by a per-weight cost measured on the default model.

The constants below that are not counted from the code were measured (each comment says on what;
docs/big-models.md has the figures). Memory is in GiB (2³⁰ bytes), as bitplan's own `peak_rss_gb`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from .devices import BASE_HOST_BYTES, RUNTIME_HOST_BYTES, Available, available, fmt_bytes
from .errors import BitplanError

GIB = 2 ** 30

# Measured on this repository's CPU machine (docs/big-models.md, "How the forecast is made"): the process itself
# (BASE_HOST_BYTES, RUNTIME_HOST_BYTES: bitplan.devices, which eval's offloading also counts with);
# a CUDA context with cuBLAS/cuSOLVER loaded adds host memory of its own (not measured here: a nominal figure);
CUDA_HOST_BYTES = 1.5 * GIB
# what opening a model for lazy apply adds (its skeleton on the meta device, buffers, tokenizer, the model's code):
# 0.31 GiB on a model folder of the default model's shape (bitplan.apply.source.open_source);
LAZY_OPEN_BYTES = 0.31 * GIB
# and device memory (context, allocator reserve);
CUDA_DEVICE_BYTES = 1.0 * GIB
# vocab-wide float32 rows alive per token at the loss: logits, log-softmax (saved), its gradient, the logits'
# gradient and a softmax row being sampled;
LOGIT_COPIES = 5
# float64 n×n buffers alive at once in one layer's coefficients (rotated halves, judges' Cholesky factors,
# the shrunk factor, its Cholesky, the triangular solve) beyond the loaded halves, per side;
COEF_BUFFERS = 12
# apply's rounding of one m×n layer (bitplan.apply.layer), in float64: the factors are read as one summed n×n buffer
# per side, each block-LDL'd in its own buffer plus its Cholesky factor (which becomes L), so two n×n buffers of
# the side being split beside the other side's; then L of both sides and m×n buffers (rotated W, scale, zero, the
# feedback M, Ŵ, codes, then E, the error of round-to-nearest and the proxies' products; glibc's retained blocks):
# APPLY_WEIGHT_BUFFERS of them, fitted to the peak of a 8192×2048 yaqa higgs-p2 layer at Llama-3.2-1B's shape,
# 1.51 GiB above the process (benchmarks/apply_memory.py; 2026-12-06, 2-core CPU beside a profile)
APPLY_WEIGHT_BUFFERS = 8
# a matrix whose rows round alone (no output-side factor: bitplan.apply.layer.rows_round_alone) and whose float64
# copy is larger than this is rounded a block of rows of this size at a time (bitplan.apply.run); a rotated
# format's blocks are rows of the whole weight rotated first, in one float64 buffer
ROW_BLOCK_BYTES = 128 * 2 ** 20
# the format errors of one m×n matrix (bitplan.profile.relerr): its rotated float32 copy (4 bytes per weight, and 4
# more for a float32 copy of weights held in another dtype or on a device), then one block of rows at a time, of
# FORMAT_BLOCK_BYTES / FORMAT_BLOCK_SIZING weights (relerr's BLOCK_BYTES / WORK_BYTES_PER_WEIGHT), whose working set
# per weight is 45 bytes + 30 per (group size, vector length) of grid formats (their shared normalized vectors):
# 147–165 bytes with the default 39 formats' four pairs on a 2048×1024 random matrix (benchmarks/relerr_memory.py)
FORMAT_BLOCK_BYTES = 256 * 2 ** 20
FORMAT_BLOCK_SIZING = 165
FORMAT_BYTES_PER_WEIGHT = 45
FORMAT_BYTES_PER_GRID_KEY = 30
# time of the format errors per weight, in float32 flop equivalents of the forward pass: the default profile of the
# default model (39 formats, 134.5 M weights, 357 s against its 275 s forward+backward of 64 K tokens; docs/
# results.md, "Cost") split as one 1536×576 matrix's measured costs split it: the rotation once, each grid
# format (k-d tree search) 6 × an integer one;
FORMAT_ROTATION_FLOPS = 2.9e3
FORMAT_GRID_FLOPS = 1.2e4
FORMAT_OTHER_FLOPS = 1.9e3
# writing a half's factor files (symmetrized float32 from the float64 sums), per byte written, in the same units:
# the default profile's factor phase less its passes and accumulation (16 s for 3.5 GB of hessians/);
WRITE_FLOPS_PER_BYTE = 600.0
# apply's error feedback runs as batches of 16-wide tile products, one batch per anti-diagonal wavefront: per flop
# about 45 × a 2048² float32 matmul's time (quantize_layer, yaqa, int4-g128, 576×1536, 1536×576, 576×576 and
# 192×576: 0.4–6.5 s each), and a forward+backward ran at 0.47 × that matmul's rate: 21 × a forward+backward
# flop; a grid format's per-tile codebook search, 7e4 flop equivalents per weight (higgs-p2-n64-g128 against
# int4-g128 on 576×1536)
FEEDBACK_COST = 21.0
APPLY_GRID_FLOPS = 7.0e4

# Float64 work per flop relative to the model's float32 matmuls on a CPU: its vector units do half as many.
CPU_F64_COST = 2.0
# A bf16/fp16 model's matmuls on a data-centre GPU (A100/H100) against its float32 and float64 work (no TF32),
# which run at one rate there: nominal, not measured here.
GPU_HALF_SPEEDUP = 8.0



@dataclass(frozen=True)
class Linear:
    name: str
    kind: str
    block: int
    out_features: int
    in_features: int

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class ModelShape:
    """The shapes bitplan plans for, from a Llama/Qwen/Mistral/Gemma-like config.json."""
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    fused: bool = False          # qkv_proj and gate_up_proj (Phi-3)
    norms_per_block: int = 2     # Gemma 2/3: 4
    biases: tuple[str, ...] = ()  # the linears with a bias: Qwen2's q/k/v, attention_bias, mlp_bias
    config_dtype: str | None = None

    @classmethod
    def from_config(cls, config: dict, name: str = "model") -> "ModelShape":
        cfg = {**config, **(config.get("text_config") or {})}
        experts = next((int(cfg[k]) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                        if isinstance(cfg.get(k), int) and cfg[k] > 1), None)
        if experts:
            raise BitplanError(f"{name} is a mixture-of-experts model ({experts} experts per block): bitplan cannot "
                               "quantize mixture-of-experts models yet, so it has no resource plan for one")
        try:
            hidden, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
            heads, vocab = int(cfg["num_attention_heads"]), int(cfg["vocab_size"])
            intermediate = int(cfg["intermediate_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise BitplanError(f"the config of {name} lacks {e} (or it is not a number): the resource plan needs "
                               "hidden_size, intermediate_size, num_hidden_layers, num_attention_heads and "
                               "vocab_size (a Llama/Qwen/Mistral/Gemma-like config.json)") from None
        kind = str(cfg.get("model_type", ""))
        biases = ("q_proj", "k_proj", "v_proj") if kind.startswith("qwen2") else ()
        if cfg.get("attention_bias"):
            biases = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")
        if cfg.get("mlp_bias"):
            biases += ("gate_proj", "up_proj", "gate_up_proj", "down_proj")
        return cls(name=name, hidden=hidden, intermediate=intermediate, layers=layers, heads=heads,
                   kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or hidden // heads), vocab=vocab,
                   tied=bool(cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", True))),
                   fused=kind in ("phi3",), norms_per_block=4 if kind.startswith(("gemma2", "gemma3")) else 2,
                   config_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "") or None, biases=biases)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[Linear]:
        """The block linears `find_linears` plans, in forward order."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        if self.fused:
            shapes = [("self_attn.qkv_proj", q + 2 * kv, h), ("self_attn.o_proj", h, q),
                      ("mlp.gate_up_proj", 2 * i, h), ("mlp.down_proj", h, i)]
        else:
            shapes = [("self_attn.q_proj", q, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h),
                      ("self_attn.o_proj", h, q), ("mlp.gate_proj", i, h), ("mlp.up_proj", i, h),
                      ("mlp.down_proj", h, i)]
        return [Linear(f"model.layers.{b}.{sub}", sub.rsplit(".", 1)[-1], b, m, n)
                for b in range(self.layers) for sub, m, n in shapes]

    def block_linears(self) -> list[Linear]:
        return [x for x in self.linears() if x.block == 0]

    @property
    def block_params(self) -> int:
        return (sum(x.params + (x.out_features if x.kind in self.biases else 0) for x in self.block_linears())
                + self.norms_per_block * self.hidden)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        """Every parameter: blocks, embedding, an untied head, the final norm."""
        return (self.layers * self.block_params + self.embedding_params * (1 if self.tied else 2) + self.hidden)

    def outer_matrices(self) -> int:
        """The embedding, and the head when untied (the format phase measures each)."""
        return 1 if self.tied else 2

    def forward_flops(self, seqlen: int) -> float:
        """Multiply-adds × 2 per token of one forward: every block matmul, the head, causal attention."""
        per_block = 2 * sum(x.params for x in self.block_linears()) + 2 * seqlen * self.q_dim
        return self.layers * per_block + 2 * self.embedding_params

    def block_flops(self, seqlen: int) -> float:
        return 2 * sum(x.params for x in self.block_linears()) + 2 * seqlen * self.q_dim

    def saved_per_token(self) -> int:
        """Values autograd keeps per token in a forward+backward with frozen weights: per block the two norm
        inputs, q, k, v, the attention output, the MLP's gate, activation and up (a frozen linear keeps no input)."""
        return self.layers * (self.norms_per_block * self.hidden + 2 * self.q_dim + 2 * self.kv_dim
                              + 3 * self.intermediate)

    def hooked_per_token(self) -> int:
        """Inputs the factor hooks keep on top: the attention's and the MLP's normalized inputs, the down input."""
        return self.layers * (2 * self.hidden + self.intermediate)


@dataclass
class ProfileSettings:
    samples: int = 256
    seqlen: int = 256
    batch_size: int = 4
    factor_groups: int | None = None     # None: the smallest that fits (choose_factor_groups)
    noise_samples: int = 1
    judge_samples: int = 64
    outer_windows: int = 32
    sketch_chunk: int = 1
    checkpoint_every: int = 64
    formats: int = 39                    # candidate formats
    grid_formats: int = 28               # of which grid (higgs) formats
    grid_keys: int = 4                   # distinct (group size, vector length) among the grid formats
    noise_levels: int = 2
    dtype_bytes: int = 4
    device: str = "cpu"                  # "cpu" or "cuda"
    processes: int = 1


@dataclass
class ApplySettings:
    samples: int = 256                   # the profile's calibration (the time unit's forward+backward)
    seqlen: int = 256
    rounding: str = "yaqa"
    workers: int = 1
    dtype_bytes: int = 4
    device: str = "cpu"
    lazy: bool = True                    # weights read per layer from the shards (never the whole model)
    processes: int = 1
    choose_shrink: frozenset[str] = frozenset()   # layers whose yaqa λs apply chooses (the profile has none)


@dataclass
class Phase:
    name: str
    times_fb: float         # expected time as a multiple of one plain forward+backward over the calibration
    host_bytes: float       # peak resident memory of a process during the phase
    device_bytes: float     # peak device memory (0 on the CPU)
    note: str = ""


@dataclass
class ResourcePlan:
    kind: str                       # "profile" or "apply"
    model: ModelShape
    device: str
    phases: list[Phase]
    disk_bytes: float               # hessians/ (profile), the checkpoint (apply)
    disk_peak_bytes: float          # with the job's transient files (factor checkpoints, part files)
    factor_groups: int = 1
    passes: int = 0                 # forward+backward passes over the calibration
    fb_flops: float = 0.0           # one plain forward+backward over the calibration
    notes: list[str] = field(default_factory=list)

    @property
    def host_bytes(self) -> float:
        return max(p.host_bytes for p in self.phases)

    @property
    def device_bytes(self) -> float:
        return max(p.device_bytes for p in self.phases)

    @property
    def times_fb(self) -> float:
        return sum(p.times_fb for p in self.phases)

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)


# ------------------------------------------------------------------------------------------------- memory

def factor_sum_bytes(linears: list[Linear], moments: bool = True) -> int:
    """float64 running sums of one calibration half: H_O m×m, H_I n×n and (with moments) Σxxᵀ n×n per layer."""
    return sum(8 * (x.out_features ** 2 + (2 if moments else 1) * x.in_features ** 2) for x in linears)


def format_bytes(m: int, n: int, grid_keys: int, copied: bool = False) -> int:
    """Host bytes of one m×n matrix's format errors: its rotated copy (and a float32 copy when `copied`), and
    one block of rows's working set (relerr's block sizing)."""
    rows = max(1, min(m, FORMAT_BLOCK_BYTES // (FORMAT_BLOCK_SIZING * n)))
    return (8 if copied else 4) * m * n + rows * n * (FORMAT_BYTES_PER_WEIGHT + FORMAT_BYTES_PER_GRID_KEY * grid_keys)


def hessian_file_bytes(linears: list[Linear], moments: bool = True) -> int:
    """One half's float32 files (h_out, h_in, xtx), tensor bytes only."""
    return factor_sum_bytes(linears, moments) // 2


def coefficient_bytes(m: int, n: int) -> float:
    """One m×n layer's held-out LDLs (the profile's layer phase, or apply choosing λ): both halves' H_O, H_I and
    Σxxᵀ in float64, and the buffers of the LDLs judged on them."""
    return 16 * (m ** 2 + 2 * n ** 2) + COEF_BUFFERS * 8 * (m ** 2 + n ** 2)


def coefficient_flops(m: int, n: int) -> float:
    """The same layer's multiply-adds: every λ's Cholesky and triangular solve, both ways, on both sides."""
    return 2 * (11.0 * m ** 3 + 12.7 * n ** 3)


def row_block_rows(m: int, n: int, tile: int = 16) -> int | None:
    """Rows per block when an m×n matrix whose rows round alone is rounded a block of rows at a time (whole
    `tile`-row tiles of ROW_BLOCK_BYTES in float64), or None when its float64 copy fits one such block."""
    if 8 * m * n <= ROW_BLOCK_BYTES:
        return None
    return max(tile, ROW_BLOCK_BYTES // (8 * n) // tile * tile)


def layer_groups(linears: list[Linear], groups: int) -> list[list[Linear]]:
    """The contiguous runs `profile.phases.layer_groups` makes."""
    bounds = [round(k * len(linears) / groups) for k in range(groups + 1)]
    return [linears[bounds[k]:bounds[k + 1]] for k in range(groups)]


def _split(device: str, compute: float, host_extra: float = 0.0, ran: bool = True) -> tuple[float, float]:
    """(host, device) bytes: on the CPU everything is resident in the process; on a GPU the compute side is on
    the device and the host keeps the process, the CUDA context and `host_extra`. `ran`: a forward+backward has
    run in the process (its runtime buffers are resident)."""
    base = BASE_HOST_BYTES + (RUNTIME_HOST_BYTES if ran else 0.0)
    if device == "cpu":
        return base + compute + host_extra, 0.0
    return base + CUDA_HOST_BYTES + host_extra, CUDA_DEVICE_BYTES + compute


def _cost(device: str, kind: str, dtype_bytes: int) -> float:
    """Cost of one flop of `kind` (f32, f64) relative to one of the model's own matmuls."""
    if device == "cpu":
        return CPU_F64_COST if kind == "f64" else 1.0
    return 1.0 if dtype_bytes == 4 else GPU_HALF_SPEEDUP


# ------------------------------------------------------------------------------------------------ profile

def profile_plan(config: dict | ModelShape, settings: ProfileSettings) -> ResourcePlan:
    """Per-process forecast of `bitplan profile` with these settings."""
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    s = settings
    linears = shape.linears()
    G = s.factor_groups or 1
    if not 1 <= G <= len(linears):
        raise BitplanError(f"--factor-groups must be between 1 and the number of layers ({len(linears)}), got {G}")
    W = max(1, s.processes)
    T, db = s.seqlen, s.dtype_bytes
    tokens = s.samples * T
    batch_tokens = min(s.batch_size, s.samples) * T
    weights = shape.params * db
    fwd = shape.forward_flops(T)
    fb_token = 2 * fwd                       # backward to the activations only: about one more forward
    fb = tokens * fb_token
    f32, f64 = _cost(s.device, "f32", db), _cost(s.device, "f64", db)
    act = (shape.saved_per_token() * db + LOGIT_COPIES * shape.vocab * 4)
    widest = max(linears, key=lambda x: x.out_features * x.in_features)
    # load: the weights in their dtype (on a GPU straight from the shards to the device: accelerate's device_map)
    host, dev = _split(s.device, weights, ran=False)
    phases: list[Phase] = [Phase("load", 0.0, host, dev, f"{fmt_bytes(weights)} of weights")]

    # noise: the cache of every block's input and the reference log-probs, then one layer's reruns from its block
    n_noise = min(s.noise_samples, s.samples) * T
    if n_noise:
        cache = n_noise * (shape.layers * shape.hidden * db + 2 * shape.vocab * 4 + shape.hidden * db)
        rerun = min(s.batch_size, s.noise_samples) * T * 4 * shape.vocab * 4
        host, dev = _split(s.device, weights + cache + rerun)
        per_layer = [(shape.layers - x.block) * shape.block_flops(T) + 2 * shape.embedding_params + 6 * shape.vocab
                     for x in linears]
        flops = n_noise * (s.noise_levels * (sum(per_layer) + fwd + (0 if shape.tied else 2 * shape.embedding_params))
                           + 2 * fwd)
        phases.append(Phase("noise", flops / W / fb, host, dev, f"{len(linears) + shape.outer_matrices()} layers × "
                                                            f"{s.noise_levels} levels on {n_noise} tokens"))

    # factors: one group's float64 sums, a batch's activations, the hooks' inputs, one layer's batch statistics
    groups = layer_groups(linears, G)
    owned = {x.name for k, x in enumerate(linears) if k % W == 0}   # rank 0's layers (round-robin owners)
    sums = max(factor_sum_bytes([x for x in g if x.name in owned]) for g in groups)
    hooked = batch_tokens * shape.hooked_per_token() * db
    stats = batch_tokens * (widest.out_features + widest.in_features) * 4 + \
        12 * (widest.out_features ** 2 + widest.in_features ** 2)
    steps = -(-(-(-s.samples // 2) // s.batch_size) // W)
    every = max(1, s.checkpoint_every // (s.batch_size * W))
    checkpoints = steps > every
    host, dev = _split(s.device, weights + sums + batch_tokens * act + hooked + stats,
                       host_extra=sums if (s.device != "cpu" and checkpoints) else 0.0)
    accumulate = 0.0                  # multiply-adds per token
    tri = 0.55 if s.sketch_chunk == 1 else 1.0   # weighted_gram multiplies block triangles only
    window = s.sketch_chunk < T       # the whole windows' T×T Grams (Σ_w‖G_w‖²)
    inputs_seen = set()               # q/k/v (gate/up) share their input's Σxxᵀ and window Gram
    for x in linears:
        accumulate += tri * (x.out_features ** 2 + x.in_features ** 2) + s.sketch_chunk * (x.out_features + x.in_features)
        accumulate += tri * T * x.out_features if window else 0.0
        ident = (x.block, "attn" if x.kind in ("q_proj", "k_proj", "v_proj", "qkv_proj")
                 else "mlp" if x.kind in ("gate_proj", "up_proj", "gate_up_proj") else x.kind)
        if ident not in inputs_seen:
            inputs_seen.add(ident)
            accumulate += 0.55 * x.in_features ** 2 + (tri * T * x.in_features if window else 0.0)
    written = 2 * hessian_file_bytes(linears) * WRITE_FLOPS_PER_BYTE
    phases.append(Phase("factors", (G + (tokens * 2 * accumulate * f32 + written) / fb) / W, host, dev,
                        f"{G} group(s) × 2 halves; {fmt_bytes(sums)} of float64 sums per group"))

    # outer: one window at a time with the embedding's (and head's) weight gradient
    n_outer = min(s.outer_windows, s.samples)
    outer_grad = shape.outer_matrices() * shape.embedding_params * (4 + 8)
    host, dev = _split(s.device, weights + T * act + outer_grad + 2 * 8 * shape.hidden ** 2)
    phases.append(Phase("outer", n_outer * T * (fb_token + 2 * 2 * shape.embedding_params) / fb, host, dev,
                        f"{n_outer} windows, embedding{' and head' if not shape.tied else ''} gradients"))

    # layers: one layer's loaded halves and its block LDLs, the widest layer sets the peak
    coef = max(coefficient_bytes(x.out_features, x.in_features) for x in linears)
    host, dev = _split(s.device, weights + coef)
    flops = sum(coefficient_flops(x.out_features, x.in_features) for x in linears) / W
    phases.append(Phase("layers", flops * f64 / fb, host, dev, "block LDL, held-out gains and λ of every layer"))

    # formats: every matrix in every candidate format, a block of rows at a time; the largest sets the peak
    shapes = [(x.out_features, x.in_features) for x in linears] + [(shape.vocab, shape.hidden)] * shape.outer_matrices()
    matrices = [m * n for m, n in shapes]
    copied = s.device != "cpu" or db != 4
    fmt_peak = max(format_bytes(m, n, s.grid_keys, copied) for m, n in shapes)
    host, dev = _split(s.device, weights + fmt_peak)
    per_weight_flops = (FORMAT_ROTATION_FLOPS + FORMAT_GRID_FLOPS * s.grid_formats
                        + FORMAT_OTHER_FLOPS * (s.formats - s.grid_formats))
    flops = sum(matrices) * per_weight_flops / W
    phases.append(Phase("formats", flops / fb, host, dev, f"{s.formats} formats; {fmt_bytes(fmt_peak)} for the "
                                                          "largest matrix, in blocks of rows"))

    # judge: sampled windows, their factors one group of layers at a time (as the factors'), one layer's judging
    if s.judge_samples:
        j_tokens = s.judge_samples * T
        j_sums = max(factor_sum_bytes(g, moments=False) for g in groups) // W
        kv_cache = s.judge_samples * T * shape.layers * 2 * shape.kv_dim * db
        host, dev = _split(s.device, weights + max(j_sums + batch_tokens * act + hooked + stats, kv_cache))
        j_acc = sum(0.55 * (x.out_features ** 2 + x.in_features ** 2) for x in linears)
        judging = sum(2 * 4 * 0.83 * (x.out_features ** 3 + x.in_features ** 3) for x in linears) / W
        flops = j_tokens * (fwd + G * fb_token + 2 * j_acc * f32) + judging * f64
        phases.append(Phase("judge", flops / fb, host, dev, f"{s.judge_samples} sampled windows; "
                                                            f"{fmt_bytes(j_sums)} of float64 sums "
                                                            f"({'all layers' if G == 1 else 'the largest group'})"))

    disk = 2 * hessian_file_bytes(linears) + 2 * 4 * shape.hidden ** 2
    if s.judge_samples:
        disk += hessian_file_bytes(linears, moments=False)
    peak_disk = disk + (max(factor_sum_bytes(g) for g in groups) if checkpoints else 0)
    passes = G + (1 if n_outer else 0) + (G if s.judge_samples else 0)
    return ResourcePlan("profile", shape, s.device, phases, disk, peak_disk, G, passes, fb)


# -------------------------------------------------------------------------------------------------- apply

def apply_plan_resources(config: dict | ModelShape, formats: dict[str, str], settings: ApplySettings) -> ResourcePlan:
    """Per-process forecast of `bitplan apply` of `formats` (layer name → format name, as in plan.json)."""
    from .formats import get_format

    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    s = settings
    T, db = s.seqlen, s.dtype_bytes
    fb = s.samples * T * 2 * shape.forward_flops(T)
    f64 = _cost(s.device, "f64", db)
    by_name = {x.name: x for x in shape.linears()}
    emb_shape = (shape.vocab, shape.hidden)
    packed = 0.0
    flops = 0.0
    layer_peak = 0.0
    rounding_layers = 0
    choosing = 0
    fmts = {}
    for name, fname in formats.items():
        fmt = fmts.get(fname) or fmts.setdefault(fname, get_format(fname))
        x = by_name.get(name)
        m, n = (x.out_features, x.in_features) if x is not None else emb_shape
        packed += fmt.storage_bits(m, n) / 8
        if fmt.kind == "fp16":
            continue
        rounding_layers += 1
        two_sided = s.rounding == "yaqa" and x is not None
        one_sided = s.rounding != "rtn"
        flops += m * n * (FORMAT_ROTATION_FLOPS + FORMAT_OTHER_FLOPS)
        if one_sided:
            # block LDL of each factor (n³/3 multiply-adds and as many to form L), the proxies (4·m·n·(m + n)), the
            # feedback (m·n·(m + n)); the codebook search tile by tile
            feedback = 2 * m * n * ((m if two_sided else 0) + n)
            flops += f64 * (2 * 0.67 * n ** 3 + (2 * 0.67 * m ** 3 if two_sided else 0) + 4 * feedback)
            flops += FEEDBACK_COST * feedback + (APPLY_GRID_FLOPS * m * n if fmt.kind == "grid" else 0)
        elif fmt.kind == "grid":
            flops += m * n * FORMAT_GRID_FLOPS
        # the factors' block LDL (two n×n buffers of the side being split, the other side's sum or L beside them),
        # or later both L and the rounding's weight-sized buffers, whichever is larger; a large matrix whose rows
        # round alone has those buffers for one block of rows, and its packed blocks (twice, as they are joined)
        # beside the whole weight rotated when its format rotates
        sides = [n * n] + ([m * m] if two_sided else []) if one_sided else []
        rows = None if two_sided else row_block_rows(m, n)
        # in blocks, the weight is not read whole (in float32) beside the factors' LDL
        ldl_bytes = 8 * (sum(sides) + max(sides)) + (0 if rows else 4 * m * n) if sides else 0
        if rows:
            rounding_bytes = (APPLY_WEIGHT_BUFFERS * 8 * rows * n + 8 * sum(sides) + 2 * fmt.storage_bits(m, n) / 8
                              + (8 * m * n if fmt.rotated else 0))   # a rotated format's whole rotated weight
        else:
            rounding_bytes = APPLY_WEIGHT_BUFFERS * 8 * m * n + 8 * sum(sides)
        # λ chosen here: every factor of both halves read and judged first, as the profile's layer phase does
        choice = two_sided and name in s.choose_shrink
        if choice:
            choosing += 1
            flops += f64 * coefficient_flops(m, n)
        layer_peak = max(layer_peak, ldl_bytes, rounding_bytes, coefficient_bytes(m, n) if choice else 0)
    # lazy: a block of rows of one tensor at a time (bitplan.shards) and each layer's packed tensors in its part
    # file; else the whole model and every packed layer until the checkpoint is written
    held = LAZY_OPEN_BYTES if s.lazy else shape.params * db + packed
    workers = max(1, min(s.workers, rounding_layers or 1))
    host, dev = _split(s.device, workers * layer_peak, host_extra=held, ran=False)
    planned = sum(by_name[n].params if n in by_name else shape.embedding_params for n in formats)
    fp16_rest = (shape.params - planned) * 2     # every tensor the plan leaves out is stored fp16
    phase = Phase("rounding", flops / max(1, s.processes) / fb, host, dev,
                  f"{rounding_layers} layers, {s.rounding}, {workers} at once"
                  + (f"; λs of {choosing} chosen from both halves (the profile has none for these settings)"
                     if choosing else ""))
    plan = ResourcePlan("apply", shape, s.device, [phase], packed + fp16_rest, packed + fp16_rest + packed,
                        fb_flops=fb)
    return plan


# ------------------------------------------------------------------------------------------ does it fit

def check(plan: ResourcePlan, free: Available) -> str | None:
    """None when the plan fits `free`, else one line: which phases do not fit, and what to change for each."""
    dev_short = free.device_bytes is not None and plan.device_bytes > free.device_bytes
    if not dev_short and plan.host_bytes <= free.host_bytes:
        return None
    where, have = ("device", free.device_bytes) if dev_short else ("host", free.host_bytes)

    def need(p: Phase) -> float:
        return p.device_bytes if dev_short else p.host_bytes

    over = sorted((p for p in plan.phases if need(p) > have), key=need, reverse=True)
    phases = ", ".join(f"{p.name} {fmt_bytes(need(p))}" for p in over[:3]) + (", …" if len(over) > 3 else "")
    advice = "; ".join(dict.fromkeys(_advice(plan, p, where) for p in over[:2]))   # the two largest: one line
    return (f"the {plan.kind} needs {fmt_bytes(need(over[0]))} of {where} memory per process ({phases}) and "
            f"{fmt_bytes(have)} is free: {advice}")


def _advice(plan: ResourcePlan, worst: Phase, where: str) -> str:
    if plan.kind == "apply":
        return ("use --workers 1 (layers rounded at once), more processes (torchrun), or a machine with more "
                "memory")
    if worst.name == "factors":
        return ("more --factor-groups (each pass keeps 1/G of the float64 sums), more processes (torchrun: each "
                "keeps 1/world of them), or fewer tokens per batch (--batch-size)")
    if worst.name == "judge":
        return ("more --factor-groups (the judge keeps one group's float64 factors at a time), fewer "
                "--judge-samples (0: no judge), or more processes (torchrun)")
    if worst.name == "noise":
        return "fewer --noise-samples (each caches every block's input and the vocab-wide log-probs)"
    if worst.name == "formats":
        return ("fewer grid group sizes and vector lengths in --formats (a block of rows holds each one's "
                "normalized form), or a machine with more memory (the largest matrix is held rotated)")
    if worst.name == "outer":
        return "a machine with more memory (the embedding's gradient and the model are held at once)"
    return ("the largest layer's float64 factors do not fit: a machine with more memory" if worst.name == "layers"
            else f"a machine with more {where} memory")


def fits(plan: ResourcePlan, free: Available | None = None) -> bool:
    return check(plan, free or available(plan.device)) is None


def choose_factor_groups(config: dict | ModelShape, settings: ProfileSettings,
                         free: Available) -> tuple[int, ResourcePlan]:
    """The smallest --factor-groups whose forecast fits `free`, with its plan. When another phase than those
    groups divide (the factors', the judge's) does not fit, more groups cannot help: G = 1 and its plan; when no G
    fits, the largest's (check() then says what to change)."""
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)

    def fits_in(p: Phase) -> bool:
        return p.host_bytes <= free.host_bytes and (free.device_bytes is None or p.device_bytes <= free.device_bytes)

    grouped = ("factors", "judge")
    plan = profile_plan(shape, replace(settings, factor_groups=1))
    if not all(fits_in(p) for p in plan.phases if p.name not in grouped):
        return 1, plan
    for G in _group_candidates(len(shape.linears())):
        plan = profile_plan(shape, replace(settings, factor_groups=G))
        if all(fits_in(p) for p in plan.phases if p.name in grouped):
            return G, plan
    return plan.factor_groups, plan


def _group_candidates(n: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, … up to every layer alone: each step adds at most a third of the passes."""
    out, g = [], 1
    while g < n:
        out.append(g)
        g = max(g + 1, int(g * 1.34))
    return out + [n]


# ------------------------------------------------------------------------------------------ from the CLI

def format_counts(formats: str | list | None) -> tuple[int, int, int]:
    """(candidate formats, grid formats among them, their distinct (group size, vector length)) of --formats."""
    from .formats.higgs import GridFormat
    from .profile.inputs import candidate_formats

    grids = [m for m in (f.for_measuring() for f in candidate_formats(formats)) if isinstance(m, GridFormat)]
    return len(candidate_formats(formats)), len(grids), len({(m.group_size, m.vector_dim) for m in grids})


def processes() -> int:
    """Processes of the job: torchrun's WORLD_SIZE, else 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def profile_job(model: str, *, samples: int, seqlen: int, batch_size: int, factor_groups: int | None,
                noise_samples: int, judge_samples: int | None, sketch_chunk: int, checkpoint_every: int,
                formats: str | list | None, device: str = "auto", dtype: str = "auto",
                free: Available | None = None) -> tuple[ResourcePlan, str | None]:
    """(plan, refusal) of `bitplan profile MODEL` with these options, from the model's config.json; with
    `factor_groups` None the plan has the smallest G that fits `free` (default: what is free here now). The
    refusal is None when the job fits, else check()'s one line."""
    from .profile.defaults import DEFAULT_JUDGE_SAMPLES, DEFAULT_OUTER_WINDOWS

    config, name = read_config(model)
    kind = device_kind(device)
    if judge_samples is None:   # the profile's default: a judge for a model that names a BOS or EOS token
        names = any(config.get(k) is not None for k in ("bos_token_id", "eos_token_id"))
        judge_samples = DEFAULT_JUDGE_SAMPLES if names else 0
    count, grids, keys = format_counts(formats)
    settings = ProfileSettings(samples=samples, seqlen=seqlen, batch_size=batch_size, factor_groups=factor_groups,
                               noise_samples=noise_samples, judge_samples=judge_samples,
                               outer_windows=DEFAULT_OUTER_WINDOWS, sketch_chunk=sketch_chunk,
                               checkpoint_every=checkpoint_every, formats=count, grid_formats=grids, grid_keys=keys,
                               dtype_bytes=dtype_bytes(dtype, kind, config), device=kind, processes=processes())
    shape = ModelShape.from_config(config, name)
    free = free or available(device if kind == "cuda" else "cpu")
    if factor_groups is None:
        _, plan = choose_factor_groups(shape, settings, free)
    else:
        plan = profile_plan(shape, settings)
    return plan, check(plan, free)


def apply_job(plan_path: str | Path, *, model: str | None = None, rounding: str | None = None,
              profile_dir: str | Path | None = None, workers: int | None = None, device: str = "auto",
              dtype: str = "auto", shrink: str | float = "auto", shrink_target: str | None = None,
              free: Available | None = None) -> tuple[ResourcePlan, str | None]:
    """(plan, refusal) of `bitplan apply PLAN` from the plan's formats and the model's config.json; with the
    profile's hessians/ at hand, it also says whether apply must choose yaqa's λs itself (`shrink` auto, and the
    profile chose none for these factors and `shrink_target`, None: apply's default)."""
    from .heldout import DEFAULT_SHRINK_TARGET
    from .profile.directory import ProfileDir
    from .profile.hessians import factors_path
    from .solve import load_plan

    plan_path = Path(plan_path)
    solved = load_plan(plan_path)
    recorded = (solved.profile or {}).get("model") or {}
    spec = model or recorded.get("spec") or recorded.get("id")
    if spec is None:
        raise BitplanError(f"{plan_path} does not name its model; pass --model")
    config, name = read_config(spec)
    kind = device_kind(device)
    samples, seqlen = 256, 256    # the default profile's calibration, unless the plan's profile says
    prof = ProfileDir.of(profile_dir) or ProfileDir.recorded_in(solved.profile, plan_path)
    if prof is not None and (prof.path / "profile.json").is_file():
        fp = json.loads((prof.path / "profile.json").read_text()).get("settings", {}).get("fingerprint", {})
        samples, seqlen = int(fp.get("samples", samples)), int(fp.get("seqlen", seqlen))
    rounding = rounding or solved.rounding or "yaqa"
    choose = frozenset()
    if rounding == "yaqa" and str(shrink) == "auto" and prof is not None and prof.has_hessians:
        target = shrink_target or DEFAULT_SHRINK_TARGET
        choose = frozenset(n for n in solved.formats if factors_path(prof.path, n, "a").is_file()
                           and prof.chosen_shrinkage(n, target) is None)
    settings = ApplySettings(samples=samples, seqlen=seqlen, rounding=rounding,
                             workers=workers or os.cpu_count() or 1, dtype_bytes=dtype_bytes(dtype, kind, config),
                             device=kind, processes=processes(), choose_shrink=choose)
    plan = apply_plan_resources(ModelShape.from_config(config, name), solved.formats, settings)
    free = free or available(device if kind == "cuda" else "cpu")
    return plan, check(plan, free)


# ---------------------------------------------------------------------------------------------- config

def read_config(spec: str | os.PathLike) -> tuple[dict, str]:
    """(config.json, model name) of a model without reading its weights: a folder holding config.json (weights
    or not), a config.json file, a built-in name, or a hub id (only its config.json is fetched)."""
    from .models import BUILTIN_MODELS, resolve_model_path

    spec = str(spec)
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".json":
        path = p
    elif p.is_dir():
        path = p / "config.json"
        if not path.is_file():
            raise BitplanError(f"{spec} is a folder without config.json; the resource plan needs the model's "
                               "config.json")
    elif spec in BUILTIN_MODELS or p.suffix.lower() == ".gguf":
        path = resolve_model_path(spec) / "config.json"
    elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(spec, "config.json"))
        except Exception as e:
            raise BitplanError(f"cannot read the config.json of {spec} ({type(e).__name__}); pass a folder "
                               "holding it") from None
    else:
        raise BitplanError(f"model not found: {spec} (not a folder, a config.json, a hub id, or a built-in name: "
                           f"{', '.join(BUILTIN_MODELS)})")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BitplanError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise BitplanError(f"{path} is not a config.json (no JSON object)")
    if spec in BUILTIN_MODELS:
        name = spec
    elif p.is_file():   # a config.json names its folder; another .json file itself
        name = p.parent.name if p.name == "config.json" else p.stem
    else:
        name = p.name or spec
    return config, name


def device_kind(device: str) -> str:
    """"cpu" or "cuda" from a --device value, without asking torch ("auto" is the CUDA device when one is here)."""
    d = (device or "auto").strip().lower()
    if d == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if d == "cpu" or d.startswith("cuda"):
        return "cpu" if d == "cpu" else "cuda"
    raise BitplanError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N")


def dtype_bytes(dtype: str, device: str, config: dict | None = None) -> int:
    """Bytes per weight element of --dtype on `device` ("auto": the checkpoint's dtype on a GPU, float32 on
    the CPU), as bitplan.devices resolves it."""
    from .devices import resolve_dtype

    import torch

    return torch.empty(0, dtype=resolve_dtype(dtype, "cpu" if device == "cpu" else "cuda", config)).element_size()


def plan_table(plan: ResourcePlan, measured: dict[str, dict] | None = None, title: str | None = None):
    """The plan as a rich table; `measured` (phase → {"times_fb", "host_bytes", "device_bytes"}) adds the
    measured figures beside the forecast (benchmarks/scale_bench.py)."""
    from rich.table import Table

    gpu = plan.device != "cpu"
    shape = plan.model
    title = title or (f"{plan.kind} of {shape.name} ({shape.params / 1e9:.2f} B parameters) on {plan.device}: "
                      f"forecast per process")
    table = Table(title=title)
    table.add_column("phase")
    table.add_column("× fwd+bwd", justify="right")
    if measured is not None:
        table.add_column("measured", justify="right")
    table.add_column("host memory", justify="right")
    if measured is not None:
        table.add_column("measured", justify="right")
    if gpu:
        table.add_column("device memory", justify="right")
        if measured is not None:
            table.add_column("measured", justify="right")
    table.add_column("what", style="dim")
    for p in plan.phases:
        got = (measured or {}).get(p.name, {})
        row = [p.name, f"{p.times_fb:.2f}"]
        if measured is not None:
            row.append(f"{got['times_fb']:.2f}" if "times_fb" in got else "–")
        row.append(fmt_bytes(p.host_bytes))
        if measured is not None:
            row.append(fmt_bytes(got["host_bytes"]) if "host_bytes" in got else "–")
        if gpu:
            row.append(fmt_bytes(p.device_bytes))
            if measured is not None:
                row.append(fmt_bytes(got["device_bytes"]) if got.get("device_bytes") else "–")
        row.append(p.note)
        table.add_row(*row)
    total = ["total / peak", f"{plan.times_fb:.2f}"] + (["–"] if measured is not None else []) + \
        [fmt_bytes(plan.host_bytes)] + (["–"] if measured is not None else [])
    if gpu:
        total += [fmt_bytes(plan.device_bytes)] + (["–"] if measured is not None else [])
    disk = "hessians/" if plan.kind == "profile" else "checkpoint"
    extra = f"{disk} {fmt_bytes(plan.disk_bytes)} (peak {fmt_bytes(plan.disk_peak_bytes)})"
    if plan.kind == "profile":
        extra += f"; {plan.factor_groups} factor group(s), {plan.passes} pass(es)"
    table.add_row(*total, extra, style="bold")
    return table


def plan_summary(plan: ResourcePlan) -> str:
    """One line: the peaks, the disk and the time."""
    gpu = f", device {fmt_bytes(plan.device_bytes)}" if plan.device != "cpu" else ""
    return (f"{plan.kind} of {plan.model.name}: host {fmt_bytes(plan.host_bytes)}{gpu}, "
            f"disk {fmt_bytes(plan.disk_bytes)}, {plan.times_fb:.1f} × one forward+backward over the calibration")

