"""quantize_layer into ggml formats: unrotated, importance-weighted fits, LDLQ/YAQA feedback, gguf-exact blocks,
loading back through QuantizedLinear and a checkpoint."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from bitplan.apply import apply_formats, load_quantized, quantize_layer
from bitplan.apply.ldlq import proxy
from bitplan.apply.module import QuantizedLinear
from bitplan.errors import BitplanError
from bitplan.formats import get_format
from bitplan.models import find_linears, load_model


def layer_and_inputs(m: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g) * 0.05
    # correlated inputs with uneven column scales, like a real layer's
    X = torch.randn(2048, n, generator=g) * torch.linspace(0.1, 3.0, n)
    X = X @ (torch.eye(n) + 0.4 * torch.randn(n, n, generator=g) / n ** 0.5)
    return W, (X.T @ X / X.shape[0]).double()


def gguf_dequant(fmt, blocks):
    return gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(fmt.ggml_type))


@pytest.mark.parametrize("name", ["q4_K", "q3_K", "iq4_xs", "q4_0", "q5_1"])
def test_ldlq_beats_rtn_and_blocks_are_exact(name):
    fmt = get_format(name)
    W, H = layer_and_inputs(64, 512)
    res = quantize_layer("blk.0.ffn_down", W, fmt, "ldlq", H_in=H)
    rtn = quantize_layer("blk.0.ffn_down", W, fmt, "rtn", H_in=H)
    assert set(res.tensors) == {"blocks"}                     # ggml stores its blocks and nothing else
    assert res.tensors["blocks"].numel() * 8 == fmt.storage_bits(64, 512)
    assert res.stats["proxy"] <= res.stats["proxy_rtn"]
    # the proxy in the original basis (no rotation; H normalized to mean diagonal 1), float64, recomputed here
    E = lambda Wh: proxy(W.double() - Wh.double(), H / H.diagonal().mean(), None)  # noqa: E731
    assert E(res.W_hat) == pytest.approx(res.stats["proxy"], rel=1e-6)
    assert E(res.W_hat) < E(rtn.W_hat)
    assert np.array_equal(gguf_dequant(fmt, res.tensors["blocks"]), res.W_hat.numpy())
    assert np.array_equal(gguf_dequant(fmt, rtn.tensors["blocks"]), rtn.W_hat.numpy())


def test_yaqa_into_ggml_is_exact_and_no_worse():
    fmt = get_format("q4_K")
    W, H = layer_and_inputs(64, 512, seed=1)
    g = torch.Generator().manual_seed(3)
    A = torch.randn(64, 64, generator=g, dtype=torch.float64)
    Ho = A @ A.T / 64 + torch.eye(64, dtype=torch.float64)
    res = quantize_layer("blk.1.ffn_down", W, fmt, "yaqa", H_in=H, H_out=Ho)
    assert res.stats["proxy"] <= res.stats["proxy_rtn"]
    assert np.array_equal(gguf_dequant(fmt, res.tensors["blocks"]), res.W_hat.numpy())


def test_importance_is_diag_h_in():
    """With H_in, the scales are fit weighted by its diagonal: RTN from quantize_layer is fmt.quantize(W, diag H)."""
    fmt = get_format("q4_0")
    W, H = layer_and_inputs(32, 256, seed=2)
    res = quantize_layer("x", W, fmt, "rtn", H_in=H)
    ref = fmt.dequantize(fmt.quantize(W.float(), H.diagonal()))
    assert torch.equal(res.W_hat, ref)
    plain = quantize_layer("x", W, fmt, "rtn")
    assert not torch.equal(plain.W_hat, res.W_hat)
    wd = lambda Wh: float(((W.double() - Wh.double()).pow(2) * H.diagonal()).sum())  # noqa: E731
    assert wd(res.W_hat) < wd(plain.W_hat)


def test_k_type_on_576_wide_rows_is_refused():
    fmt = get_format("q4_K")
    W, H = layer_and_inputs(32, 576)
    assert not fmt.applicable(32, 576)
    with pytest.raises(BitplanError, match="256-weight blocks"):
        quantize_layer("blk.0.attn_q", W, fmt, "ldlq", H_in=H)
    res = quantize_layer("blk.0.attn_q", W, get_format("q4_0"), "ldlq", H_in=H)   # a 32-weight type fits
    assert res.stats["proxy"] <= res.stats["proxy_rtn"]


@pytest.mark.parametrize("cache", [True, False])
def test_quantized_linear_computes_with_stored_blocks(cache):
    fmt = get_format("q5_K")
    W, H = layer_and_inputs(48, 256, seed=4)
    res = quantize_layer("x", W, fmt, "ldlq", H_in=H)
    layer = QuantizedLinear(256, 48, fmt.name, res.tensors, cache=cache)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layer.effective_weight() if cache else layer.dequantized_weight(), res.W_hat)
    assert torch.allclose(layer(x), x @ res.W_hat.double().T.float(), rtol=1e-5, atol=1e-6)


def test_kernels_do_not_claim_ggml():
    from bitplan.kernels.linear import supports

    W, _ = layer_and_inputs(16, 256)
    res = quantize_layer("x", W, get_format("q4_0"), "rtn")
    layer = QuantizedLinear(256, 16, "q4_0", res.tensors)
    assert not supports(layer, torch.randn(2, 256))


def test_checkpoint_round_trip(tiny_model_dir, tmp_path):
    lm = load_model(str(tiny_model_dir))
    names = [l.name for l in find_linears(lm.model)]
    choice = ["q4_0", "q8_0", "iq4_nl", "q5_1", "q4_1"]
    formats = {name: choice[i % len(choice)] for i, name in enumerate(names)}
    W_hat = {name: quantize_layer(name, lm.model.get_submodule(name).weight, get_format(f), "rtn").W_hat
             for name, f in formats.items()}
    apply_formats(lm, formats, tmp_path / "q", rounding="rtn", progress=False)
    loaded = load_quantized(tmp_path / "q")
    for name, f in formats.items():
        module = loaded.model.get_submodule(name)
        assert isinstance(module, QuantizedLinear) and module.format.name == f
        assert torch.equal(module.effective_weight(), W_hat[name])
        assert "rotation_seeds" not in dict(module.named_buffers())
