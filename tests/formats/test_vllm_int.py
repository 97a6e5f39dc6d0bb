"""sint / uint (the integer formats vLLM runs): fits against a brute force over every fp16 scale, half-step error,
reachable codes, exact float64 decode, zero and tail groups, packing, checkpoints, and the runtime rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bitplan.apply import apply_formats, load_quantized, quantize_layer, simulate
from bitplan.apply.module import QuantizedLinear
from bitplan.errors import BitplanError
from bitplan.formats import get_format, runtime_formats, unsupported_reason
from bitplan.formats.registry import measured_mse
from bitplan.models import find_linears, load_model

from tests.apply.test_ldlq import spd

# every non-negative finite fp16 value, ascending, in float64
FP16 = np.sort(np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64))


def groups_of(W: torch.Tensor, g: int) -> list[np.ndarray]:
    """Rows' groups along the input dimension, the tail group short, row-major (as params [m, G] flatten)."""
    W = W.double().numpy()
    return [W[r, s:s + g] for r in range(W.shape[0]) for s in range(0, W.shape[1], g)]


def smallest_fp16(ok) -> float:
    """The smallest fp16 value s with ok(s), by scanning them all."""
    hits = np.flatnonzero(ok(FP16))
    assert hits.size, "no fp16 value qualifies"
    return float(FP16[hits[0]])


def test_weights(b: int, g: int, rows: int = 6) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * b + g)
    n = 3 * g + 17  # a short tail group
    W = torch.randn(rows, n, generator=gen) * torch.logspace(-3, 1, rows)[:, None]
    W[1] += 0.7  # an off-centre row: all-positive groups
    W[2, :g] = 0.0  # a zero group
    return W


test_weights.__test__ = False


def check_decoded(fmt, W, qw, scale, zero):
    """Ŵ equals the float64 reference (q − z)·scale exactly, the error is at most half a step, and the code is
    the nearest level: no neighbour is closer."""
    W_hat = fmt.dequantize(qw).double()
    q = qw.codes.double() - (2 ** (fmt.code_bits - 1) if fmt.kind == "sint" else zero.double())
    assert torch.equal(W_hat, q * scale.double())
    err = (W_hat - W.double()).abs()
    assert (err <= scale.double() / 2 * (1 + 1e-12)).all()
    for delta in (-1, 1):
        other = (q + delta) * scale.double()
        assert ((other - W.double()).abs() >= err - 1e-12 * scale.double()).all()


@pytest.mark.parametrize("b", range(2, 9))
@pytest.mark.parametrize("g", [32, 64, 128])
def test_sint_scale_is_the_smallest_covering_fp16(b, g):
    fmt = get_format(f"sint{b}-g{g}")
    assert not fmt.rotated and not fmt.has_zero
    W = test_weights(b, g)
    params = fmt.fit(W)
    assert params.zero is None and params.scale.shape == (6, 4)
    qpos, qneg = 2 ** (b - 1) - 1, 2 ** (b - 1)
    expect = [smallest_fp16(lambda s: (qpos * s >= grp.max()) & (qneg * s >= -grp.min()))
              for grp in groups_of(W, g)]
    assert params.scale.double().flatten().tolist() == expect
    assert float(params.scale[2, 0]) == 0.0
    qw = fmt.quantize(W)
    assert int(qw.codes.min()) >= 0 and int(qw.codes.max()) <= 2 ** b - 1
    assert (qw.codes[2, :g] == qneg).all()  # the zero group: q = 0, stored as the offset
    scale, _ = fmt.per_weight(params, W.shape[1])
    check_decoded(fmt, W, qw, scale, None)


@pytest.mark.parametrize("b", range(2, 9))
@pytest.mark.parametrize("g", [32, 64, 128])
def test_uint_fit_never_clamps_and_is_within_one_step_of_the_smallest_scale(b, g):
    fmt = get_format(f"uint{b}-g{g}")
    qmax = 2 ** b - 1
    W = test_weights(b, g)
    params = fmt.fit(W)
    assert not fmt.rotated and fmt.has_zero
    assert torch.equal(params.scale.half().float(), params.scale)
    z = params.zero.double().flatten().numpy()
    assert np.array_equal(z, np.round(z)) and z.min() >= 0 and z.max() <= qmax
    for grp, s, zi in zip(groups_of(W, g), params.scale.double().flatten().tolist(), z):
        lo, hi = min(grp.min(), 0.0), max(grp.max(), 0.0)
        s_cov = smallest_fp16(lambda s: qmax * s >= hi - lo)
        assert s in (s_cov, float(np.nextafter(np.float16(s_cov), np.float16(np.inf))))
        # unclamped codes: every entry's round(x/s) + z lies in [0, qmax]
        q = np.round(grp / s) + zi if s else np.full_like(grp, zi)
        assert q.min() >= 0 and q.max() <= qmax
    assert float(params.scale[2, 0]) == 0.0
    qw = fmt.quantize(W)
    scale, zero = fmt.per_weight(params, W.shape[1])
    check_decoded(fmt, W, qw, scale, zero)


def test_uint_widens_the_scale_where_the_zero_point_would_clamp():
    """lo = −1.5, hi = 1.5 at 2 bits: scale 1 fits the range, but z = round(1.5) = 2 puts 1.5 at code 4 > 3."""
    fmt = get_format("uint2-g32")
    W = torch.zeros(1, 32)
    W[0, 0], W[0, 1] = -1.5, 1.5
    params = fmt.fit(W)
    assert float(params.scale) == float(np.nextafter(np.float16(1.0), np.float16(2.0)))
    qw = fmt.quantize(W)
    scale, zero = fmt.per_weight(params, 32)
    check_decoded(fmt, W, qw, scale, zero)


@pytest.mark.parametrize("name", ["sint2-g32", "sint3-g64", "sint8-g128", "uint4-g32", "uint8-g128", "uint3-g64"])
def test_every_code_is_reachable(name):
    fmt = get_format(name)
    b, g = fmt.code_bits, fmt.group_size
    levels = 2 ** b
    s = 2.0 ** -6
    start = -(levels // 2) if fmt.kind == "sint" else -(levels // 3)  # uint: an off-centre range
    ramp = (torch.arange(levels, dtype=torch.float64) + start) * s
    # rows of one group each: both ends of the grid (so every row fits the same scale) and a slice of the ramp
    rows = [[ramp[0], ramp[-1], *ramp[i:i + g - 2]] for i in range(0, levels, g - 2)]
    W = torch.tensor([r + [ramp[0]] * (g - len(r)) for r in rows], dtype=torch.float32)
    codes = set(range(levels))
    qw = fmt.quantize(W)
    assert set(qw.codes.flatten().tolist()) == codes
    assert torch.equal(fmt.dequantize(qw), W)  # the ramp lies on the grid: exact


@pytest.mark.parametrize("name", ["sint3-g32", "uint4-g64", "uint8-g128", "sint5-g128"])
def test_pack_round_trip_and_exact_storage(name):
    fmt = get_format(name)
    W = torch.randn(7, 200, generator=torch.Generator().manual_seed(3))
    qw = fmt.quantize(W)
    packed = fmt.pack(qw)
    bits = sum(t.numel() * t.element_size() * 8 for t in packed.values())
    assert bits == fmt.storage_bits(7, 200)
    if fmt.kind == "uint":
        assert packed["zero"].dtype == torch.uint8
    back = fmt.unpack(packed, 7, 200)
    assert torch.equal(back.codes, qw.codes) and torch.equal(fmt.dequantize(back), fmt.dequantize(qw))
    with pytest.raises(BitplanError, match=name):
        fmt.unpack({**packed, "scale": packed["scale"].float()}, 7, 200)


def test_uint_refuses_a_damaged_zero_point():
    fmt = get_format("uint4-g32")
    packed = fmt.pack(fmt.quantize(torch.randn(2, 64)))
    packed["zero"][0, 0] = 200
    with pytest.raises(BitplanError, match="zero point exceeds 15"):
        fmt.unpack(packed, 2, 64)


def test_fp16_overflow_is_a_clear_error():
    with pytest.raises(BitplanError, match="fp16"):
        get_format("sint2-g32").fit(torch.full((1, 32), 1e6))
    with pytest.raises(BitplanError, match="fp16"):
        get_format("uint8-g32").fit(torch.tensor([[-1e7, 1e7] * 16]))


@pytest.mark.parametrize("name", ["sint4-g32", "uint4-g64"])
@pytest.mark.parametrize("rounding", ["rtn", "yaqa"])
def test_layer_round_trip(name, rounding):
    """RTN and YAQA (LDLQ with both factors) round to these formats; QuantizedLinear computes with what is stored."""
    m, n = 48, 64
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(0))
    res = quantize_layer("blocks.0.proj", W, get_format(name), rounding, spd(n, 1), spd(m, 2))
    assert "rotation_seeds" not in res.tensors
    layer = QuantizedLinear(n, m, name, res.tensors)
    x = torch.randn(5, n)
    assert torch.allclose(layer(x), x @ res.W_hat.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.effective_weight(), res.W_hat)
    if rounding == "yaqa":
        assert res.stats["proxy"] < res.stats["proxy_rtn"]


def test_checkpoint_equals_simulated_model(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir))
    choices = ["sint4-g32", "uint4-g32", "sint3-g64", "uint8-g32", "fp16"]
    formats = {info.name: choices[i % len(choices)] for i, info in enumerate(find_linears(lm.model))}
    apply_formats(lm, formats, tmp_path / "q", rounding="rtn", progress=False)
    reference = load_model(str(tiny_model_dir))
    W_hat = {name: quantize_layer(name, lm.model.get_submodule(name).weight, get_format(f), "rtn").W_hat
             for name, f in formats.items()}
    simulate(reference.model, W_hat)
    ids = torch.randint(0, len(lm.tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        b = reference.model(ids).logits
        for cache in (True, False):
            loaded = load_quantized(tmp_path / "q", cache=cache)
            for name, f in formats.items():
                layer = loaded.model.get_submodule(name)
                assert torch.equal(layer.dequantized_weight(), W_hat[name]), name
            a = loaded.model(ids).logits
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item()), cache


def test_registry_and_runtime_rule():
    # the shipped mse_q agrees with a fresh measurement on other N(0, 1) weights (a stale table would not)
    table = measured_mse()
    W = torch.randn(96, 3072, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for kind in ("sint", "uint"):
        for b in range(2, 9):
            for g in (32, 64, 128):
                fmt = get_format(f"{kind}{b}-g{g}")
                rel = float((fmt.dequantize(fmt.quantize(W.float())).double() - W).pow(2).sum() / W.pow(2).sum())
                assert fmt.mse_q == table[fmt.name] and abs(rel / fmt.mse_q - 1) < 0.03, fmt.name
    with pytest.raises(BitplanError, match=r"sint\{2\.\.8\}-g\{32,64,128\}, uint"):
        get_format("sint9-g128")
    vllm = {f.name for f in runtime_formats("vllm")}
    expect = {f"sint{b}-g{g}" for b in range(2, 9) for g in (32, 64, 128)}
    expect |= {f"uint{b}-g{g}" for b in (4, 8) for g in (32, 64, 128)} | {"fp16"}
    assert vllm == expect
    assert all(unsupported_reason(n, "vllm") is None for n in vllm)
    assert "4 and 8 bits" in unsupported_reason("uint3-g128", "vllm")
    assert "rotates" in unsupported_reason("int4-g128", "vllm")
    assert "llama.cpp" in unsupported_reason("q4_0", "vllm")
    assert unsupported_reason("int4-g128", "any") is None
    # vLLM needs whole groups along the input: 576 = 4.5 × 128
    assert "576 inputs are not a whole number of groups of 128" in unsupported_reason("sint4-g128", "vllm", (576, 576))
    assert unsupported_reason("sint4-g128", "vllm", (576, 1536)) is None
    assert unsupported_reason("fp16", "vllm", (576, 577)) is None
    with pytest.raises(BitplanError, match="unknown runtime"):
        runtime_formats("tgi")
