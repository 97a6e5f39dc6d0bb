"""ggml block formats against the gguf package (llama.cpp's reference dequantization and quantizer), brute force and
float64 references."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.formats import GGML_NAMES, get_format, ggml_candidates
from bitplan.formats.base import QuantizedWeight
from bitplan.formats.ggml import KVALUES, SPECS, GgmlParams

K_TYPES = [n for n in GGML_NAMES if SPECS[n].block_size == 256]
SMALL_TYPES = [n for n in GGML_NAMES if SPECS[n].block_size == 32]
SHAPES = [(3, 256), (2, 576), (4, 1536), (5, 96), (1, 512)]


def gguf_dequant(fmt, blocks: torch.Tensor) -> np.ndarray:
    return gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(fmt.ggml_type))


def weights(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # rows of different scales, a heavy-ish tail and a few outliers
    W = torch.randn(m, n, generator=g) * (0.01 + torch.rand(m, 1, generator=g))
    W[torch.rand(m, n, generator=g) < 0.01] *= 8
    return W


def random_importance(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g).pow(3) * 10


@pytest.mark.parametrize("name", GGML_NAMES)
def test_metadata_matches_gguf(name):
    f = get_format(name)
    qt = gguf.GGMLQuantizationType[name.upper()]
    assert f.ggml_type == int(qt) and f.kind == "ggml" and not f.rotated and f.vector_dim == 1
    assert (f.block_size, f.type_size) == gguf.GGML_QUANT_SIZES[qt]
    assert f.group_size == {"q2_K": 16, "q3_K": 16, "q6_K": 16}.get(name, 32)
    assert f.storage_bits(7, 512) == 7 * 512 // f.block_size * f.type_size * 8


@pytest.mark.parametrize("name", GGML_NAMES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_importance", [False, True])
def test_dequantize_equals_gguf(name, shape, with_importance):
    f = get_format(name)
    m, n = shape
    W = weights(m, n, seed=m * n)
    imp = random_importance(n, seed=n) if with_importance else None
    if n % f.block_size:
        assert not f.applicable(m, n)
        with pytest.raises(BitplanError, match="multiple of 256"):
            f.storage_bits(m, n)
        with pytest.raises(BitplanError, match="multiple of 256"):
            f.quantize(W, imp)
        return
    assert f.applicable(m, n)
    qw = f.quantize(W, imp)
    packed = f.pack(qw)
    blocks = packed["blocks"]
    assert set(packed) == {"blocks"} and blocks.dtype == torch.uint8
    assert blocks.numel() * 8 == f.storage_bits(m, n)
    back = f.unpack(packed, m, n)
    ours = f.dequantize(back)
    ref = gguf_dequant(f, blocks)
    assert ref.shape == (m, n)
    assert np.array_equal(ref, ours.numpy())
    assert torch.equal(f.dequantize(qw), ours)           # stored params reproduce the fitted ones exactly
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(f.pack(back)["blocks"], blocks)   # pack ∘ unpack is the identity
    rel = float((ours.double() - W.double()).pow(2).sum() / W.double().pow(2).sum())
    assert rel < 10 * f.mse_q                              # a sane fit, not just a consistent one


def _random_quantized(f, m: int, n: int, seed: int) -> QuantizedWeight:
    """Every code and stored scale drawn at random over its full range: exercises every bit of the layout."""
    s = SPECS[f.name]
    g = torch.Generator().manual_seed(seed)
    B, G = n // s.block_size, n // s.sub
    codes = torch.randint(0, 1 << s.code_bits, (m, n), generator=g)
    d = (torch.randn(m, B, generator=g) * 0.01).to(torch.float16).float()
    dmin = (torch.rand(m, B, generator=g) * 0.01).to(torch.float16).float() if s.has_min else None
    sc = mn = None
    if s.block_size != s.sub:
        sc = torch.randint(s.sc_lo, s.sc_hi + 1, (m, G), generator=g)
        mn = torch.randint(0, s.sc_hi + 1, (m, G), generator=g) if s.has_min else None
    if s.block_size == s.sub and s.has_min:
        dmin = (torch.randn(m, B, generator=g) * 0.01).to(torch.float16).float()   # q4_1/q5_1's m has a sign
    return QuantizedWeight(f.name, (m, n), codes.to(torch.int32), f._params(d, dmin, sc, mn))


@pytest.mark.parametrize("name", GGML_NAMES)
def test_random_codes_and_scales_pack_exactly(name):
    f = get_format(name)
    m, n = 6, 768
    qw = _random_quantized(f, m, n, seed=3)
    packed = f.pack(qw)
    assert np.array_equal(gguf_dequant(f, packed["blocks"]), f.dequantize(qw).numpy())
    back = f.unpack(packed, m, n)
    assert torch.equal(back.codes, qw.codes)
    for key in ("d", "dmin", "sc", "mn"):
        a, b = getattr(back.params, key), getattr(qw.params, key)
        assert (a is None and b is None) or torch.equal(a.to(b.dtype), b)


def test_levels_are_ggmls():
    assert torch.equal(get_format("iq4_nl").levels(), torch.tensor(KVALUES, dtype=torch.float64))
    assert get_format("q3_K").levels().tolist() == list(range(-4, 4))
    assert get_format("q6_K").levels().tolist() == list(range(-32, 32))


@pytest.mark.parametrize("name", GGML_NAMES)
def test_ldlq_codes_pack_exactly(name):
    """Codes out of error-feedback rounding (not round-to-nearest of W) still dequantize (gguf) exactly."""
    from bitplan.apply.ldlq import ldlq_round

    f = get_format(name)
    m, n = 16, 512
    W = weights(m, n, seed=11).double()
    params = f.fit(W.float())
    scale, zero = f.per_weight(params, n)
    g = torch.Generator().manual_seed(2)
    L = torch.eye(n, dtype=torch.float64) + torch.tril(torch.randn(n, n, generator=g, dtype=torch.float64), -16) * 0.2
    r = ldlq_round(W, f, scale.double(), zero.double() if zero is not None else None, L, None, 16, 16)
    rtn = f.encode(W, scale.double(), zero.double() if zero is not None else None)
    assert not torch.equal(r.codes.to(torch.int32), rtn)          # feedback moved some codes
    qw = QuantizedWeight(name, (m, n), r.codes.to(torch.int32), params)
    ref = gguf_dequant(f, f.pack(qw)["blocks"])
    assert np.array_equal(ref, f.dequantize(qw).numpy())
    assert np.array_equal(ref, r.W_hat.float().numpy())


@pytest.mark.parametrize("name", GGML_NAMES)
def test_encode_is_nearest_with_scales_fixed(name):
    f = get_format(name)
    m, n = 4, 256
    W = weights(m, n, seed=5)
    scale, zero = f.per_weight(f.fit(W), n)
    codes = f.encode(W, scale, zero)
    # brute force over every code
    allc = torch.arange(1 << f.code_bits).view(-1, 1, 1).expand(-1, m, n)
    vals = torch.stack([f.decode(c.to(torch.int32), scale, zero) for c in allc]).double()
    best = (vals - W.double()).abs().amin(0)
    got = (f.decode(codes, scale, zero).double() - W.double()).abs()
    assert torch.all(got <= best + 1e-6 * scale.double().abs() + 1e-12)


def _weighted_err(W, W_hat, imp):
    return ((W.double() - W_hat.double()).pow(2) * imp.double()).view(W.shape[0], -1, 32).sum(-1)


def _max_based(f, W: torch.Tensor) -> torch.Tensor:
    """The plain max-based scale (what llama.cpp's reference quantizer without imatrix uses), both ways for the
    symmetric types (extreme to the lowest or to the highest level), stored fp16, round-to-nearest: per block
    the dequantized candidates [k, m, n]."""
    s = SPECS[f.name]
    m, n = W.shape
    x = W.double().view(m, n // 32, 32)
    out = []
    if s.has_min:
        lo, hi = x.amin(-1), x.amax(-1)
        cands = [((hi - lo) / s.hi, lo)]
    else:
        mx = torch.gather(x, -1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
        lv = f.levels()
        cands = [(mx / float(lv[0]), None), (mx / float(lv[-1]), None)]
    for sc, z in cands:
        sc = sc.float().half().float().repeat_interleave(32, 1)
        z = z.float().half().float().repeat_interleave(32, 1) if z is not None else None
        out.append(f.decode(f.encode(W, sc, z), sc, z))
    return torch.stack(out)


@pytest.mark.parametrize("name", SMALL_TYPES)
@pytest.mark.parametrize("with_importance", [False, True])
def test_search_beats_max_based_scale(name, with_importance):
    """Block by block, the weighted search is never worse than the max-based scale in the weighted error it
    minimizes, and better in total and by ≥ 3 % in the typical block."""
    f = get_format(name)
    m, n = 32, 256
    W = weights(m, n, seed=21)
    if with_importance:
        imp = random_importance(n, seed=4)
        w_of = imp.view(1, n).expand(m, n)
        Wq = f.dequantize(f.quantize(W, imp))
    else:
        x2 = W.double().pow(2).view(m, -1, 32)
        w_of = (x2 + x2.mean(-1, keepdim=True)).view(m, n)
        Wq = f.dequantize(f.quantize(W))
    ours = _weighted_err(W, Wq, w_of)
    base = torch.stack([_weighted_err(W, c, w_of) for c in _max_based(f, W)]).amin(0)
    assert torch.all(ours <= base * (1 + 1e-9) + 1e-30)
    assert float(ours.sum()) < float(base.sum())
    assert float((ours / base).mean()) < 0.97


def test_search_near_brute_force_optimum():
    """q4_0 and q4_1 on tiny blocks: the search's weighted error is within a few percent of the best over every
    fp16 scale in a wide range (q4_1: with the LS-optimal fp16 min for each scale's codes)."""
    g = torch.Generator().manual_seed(9)
    W = torch.randn(12, 32, generator=g, dtype=torch.float64).float()
    imp = torch.rand(32, generator=g) + 0.05
    f = get_format("q4_0")
    ours = _weighted_err(W, f.dequantize(f.quantize(W, imp)), imp.expand(12, 32)).squeeze(-1)
    amax = W.abs().amax(1, keepdim=True).double()
    grid = torch.linspace(1 / 16, 1 / 4, 4000, dtype=torch.float64).view(1, -1)
    best = torch.full((12,), float("inf"), dtype=torch.float64)
    for sign in (1, -1):
        d = (sign * amax * grid).float().half().float()                            # [12, 4000] fp16 scales
        q = torch.round(W.unsqueeze(1) / d.unsqueeze(-1)).clamp(-8, 7)
        err = ((W.unsqueeze(1).double() - (q * d.unsqueeze(-1)).double()).pow(2) * imp.double()).sum(-1)
        best = torch.minimum(best, err.amin(1))
    assert torch.all(ours >= best * (1 - 1e-9))       # the brute force is a true lower bound of the search
    assert float(ours.sum()) <= 1.03 * float(best.sum())


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_rtn_not_worse_than_gguf_quantizer(name, kind):
    """Plain MSE of bitplan's RTN against llama.cpp's reference quantizer (no imatrix) as the gguf package has it."""
    g = torch.Generator().manual_seed(5)
    if kind == "normal":
        W = torch.randn(64, 1024, generator=g)
    else:
        torch.manual_seed(5)
        W = torch.distributions.StudentT(3.0).sample((64, 1024)) * (torch.rand(64, 1, generator=g) + 0.5)
    f = get_format(name)
    qt = gguf.GGMLQuantizationType(f.ggml_type)
    ours = f.dequantize(f.quantize(W)).double()
    ref = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(W.numpy(), qt), qt)).double()
    err = lambda A: float((A - W.double()).pow(2).sum())  # noqa: E731
    assert err(ours) <= err(ref)


def test_unpack_validates():
    f = get_format("q4_K")
    qw = f.quantize(weights(2, 512, seed=1))
    blocks = f.pack(qw)["blocks"]
    with pytest.raises(BitplanError, match="uint8 tensor 'blocks'"):
        f.unpack({"blocks": blocks[:, :-1]}, 2, 512)
    with pytest.raises(BitplanError, match="uint8 tensor 'blocks'"):
        f.unpack({"blocks": blocks.to(torch.int16)}, 2, 512)
    with pytest.raises(BitplanError, match="uint8 tensor 'blocks'"):
        f.unpack({"blocks": blocks, "scale": blocks}, 2, 512)
    with pytest.raises(BitplanError, match="multiple of 256"):
        f.unpack({"blocks": blocks}, 2, 544)
    with pytest.raises(BitplanError, match="importance"):
        f.fit(weights(2, 512, seed=1), torch.ones(511))
    with pytest.raises(BitplanError, match="importance"):
        f.fit(weights(2, 512, seed=1), -torch.ones(512))
    assert isinstance(qw.params, GgmlParams)


def test_menu_and_names():
    names = [f.name for f in ggml_candidates()]
    assert set(names) == set(GGML_NAMES) | {"fp16"} and names[-1] == "fp16" and names[-2] == "q8_0"
    with pytest.raises(BitplanError, match="did you mean"):
        get_format("q4_k_m")
    from bitplan.profile.inputs import candidate_formats

    assert [f.name for f in candidate_formats("ggml")] == names
    assert [f.name for f in candidate_formats("ggml,int4-g128")] == names + ["int4-g128"]


def test_relative_errors_skip_inapplicable():
    from bitplan.profile.relerr import relative_errors

    W = weights(8, 576, seed=2)
    out = relative_errors(W, "blk.0.attn_q", ggml_candidates())
    assert set(out) == set(SMALL_TYPES) | {"fp16"}
    f = get_format("q4_0")
    ref = float((f.dequantize(f.quantize(W)).double() - W.double()).pow(2).sum() / W.double().pow(2).sum())
    assert out["q4_0"] == pytest.approx(ref, rel=1e-12)      # measured on W itself, not a rotation of it


def test_solve_menu_offers_only_fitting_types():
    """`solve --formats ggml`: the menu resolves, and a 576-wide layer is never offered a K-type while a 1536-wide one is."""
    from bitplan.solve.problem import build_instance, resolve_formats
    from bitplan.solve.synthetic import synthetic_profile

    shapes = {"q_proj": (576, 576), "down_proj": (576, 1536)}
    profile = synthetic_profile(blocks=1, shapes=shapes, formats=ggml_candidates(), seed=3, vocab=100, hidden=576)
    assert [f.name for f in resolve_formats("ggml", profile)] == [f.name for f in ggml_candidates()]
    inst = build_instance(profile, formats="ggml")
    offered = {inst.layers[item[0]].name.split(".")[-1]: {f.name for f in opts}
               for item, opts in zip(inst.items, inst.options)}
    q = next(v for k, v in offered.items() if "q_proj" in k)
    down = next(v for k, v in offered.items() if "down_proj" in k)
    assert q == set(SMALL_TYPES) | {"fp16"}
    assert down == set(GGML_NAMES) | {"fp16"}


@pytest.mark.parametrize("name", GGML_NAMES)
def test_degenerate_blocks(name):
    """Zero rows, constant blocks, an outlier and columns no input reaches: still gguf-exact, zeros exact, a
    constant block within one fp16 step of its value."""
    f = get_format(name)
    W = torch.randn(4, 512, generator=torch.Generator().manual_seed(8))
    W[0] = 0
    W[1, :256] = 0.5
    W[3, 5] = 100.0
    imp = torch.rand(512, generator=torch.Generator().manual_seed(9))
    imp[:64] = 0
    for importance in (None, imp):
        qw = f.quantize(W, importance)
        d = f.dequantize(qw)
        assert np.array_equal(gguf_dequant(f, f.pack(qw)["blocks"]), d.numpy())
        assert torch.equal(d[0], torch.zeros(512))
        assert float((d[1, :256] - 0.5).abs().max()) < 2e-4
