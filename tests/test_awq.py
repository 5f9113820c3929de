import pytest
import torch

from slimlm.compress import CalibrationConfig, compress_model
from slimlm.errors import SlimlmError
from slimlm.formats import CompressedLinear, IntQuant, format_class
from slimlm.formats.scaled import ScaledQuant
from slimlm.formats.store import load_compressed, save_compressed
from slimlm.methods import LayerStats, get_method, make_config
from slimlm.methods.affine import quantize_rtn
from slimlm.methods.awq import AWQConfig, AWQQuant, awq_quantize, channel_scales


def massive(out, inp, n=1024, seed=0):
    """A weight and input statistics where a few channels carry most of the energy."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inp, generator=g) * (1 + 0.3 * torch.randn(inp, generator=g).abs())
    x[:, :3] *= torch.tensor([30.0, 12.0, 6.0])
    h = (x.T @ x / n).double()
    return torch.randn(out, inp, generator=g), h, h.diagonal().clone()


def out_err(w, wq, h):
    d = (w - wq).double()
    return float(((d @ h) * d).sum())


@pytest.mark.parametrize("bits,group,shape", [(3, 32, (16, 96)), (4, 64, (24, 128)), (2, 0, (8, 64)), (4, 32, (6, 80))])
def test_never_worse_than_rtn_and_bits_counted(bits, group, shape):
    w, h, a = massive(*shape)
    p = awq_quantize(w, h, a, AWQConfig(bits=bits, group=group, clip=False))
    rtn = quantize_rtn(w, bits, group)
    # α = 0 (plain rounding) is on the grid and the search minimises this very error
    assert out_err(w, p.dequantize(), h) <= out_err(w, rtn.dequantize(), h)
    if isinstance(p, ScaledQuant):
        assert p.nbits() == rtn.nbits() + 16 * shape[1]
        assert torch.equal(p.dequantize(), p.inner.dequantize() / p.scale.float())
    clipped = awq_quantize(w, h, a, AWQConfig(bits=bits, group=group))
    assert out_err(w, clipped.dequantize(), h) < out_err(w, rtn.dequantize(), h)


def test_scales_favour_the_massive_channels():
    w, h, a = massive(16, 64)
    p = awq_quantize(w, h, a, AWQConfig(bits=3, group=32, clip=False))
    assert isinstance(p, ScaledQuant)
    s = p.scale.float()
    assert s[0] > s[1] > s[2] > s[3:].max()
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0), rtol=2e-3)  # normalised, fp16-rounded


def test_uniform_activations_need_no_scale():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    h = torch.eye(64, dtype=torch.float64)
    p = awq_quantize(w, h, torch.ones(64, dtype=torch.float64), AWQConfig(bits=4, group=32, clip=False))
    assert isinstance(p, IntQuant)  # every α gives s = 1: no scale is stored
    assert torch.equal(p.codes, quantize_rtn(w, 4, 32).codes)


def test_gptq_variant_beats_the_rtn_variant():
    w, h, a = massive(32, 128, seed=2)
    r = awq_quantize(w, h, a, AWQConfig(bits=3, group=32))
    g = awq_quantize(w, h, a, AWQConfig(bits=3, group=32, quant="gptq"))
    assert out_err(w, g.dequantize(), h) < out_err(w, r.dequantize(), h)
    a1, a2 = awq_quantize(w, h, a, AWQConfig(bits=3, group=32)), r  # deterministic
    assert torch.equal(a1.dequantize(), a2.dequantize())


def test_scaled_format_state_and_refusals():
    w, h, a = massive(8, 64)
    p = awq_quantize(w, h, a, AWQConfig(bits=4, group=32))
    meta, tensors = p.to_state()
    assert p.nbits() == sum(t.numel() * t.element_size() * 8 for t in tensors.values())
    back = format_class("scaled").from_state(meta, tensors)
    assert torch.equal(back.dequantize(), p.dequantize())
    with pytest.raises(SlimlmError, match="positive"):
        ScaledQuant(inner=p.inner, scale=torch.zeros(64, dtype=torch.float16))
    with pytest.raises(SlimlmError, match="fp16 scale"):
        ScaledQuant(inner=p.inner, scale=torch.ones(63, dtype=torch.float16))
    with pytest.raises(SlimlmError, match="corrupt"):
        format_class("scaled").from_state(meta, {"scale": tensors["scale"]})


def test_channel_scales_stay_positive_and_finite():
    rms = torch.tensor([0.0, 1e-12, 1.0, 1e6], dtype=torch.float64)
    for alpha in (0.0, 0.5, 1.0):
        s = channel_scales(rms, alpha)
        assert s.dtype == torch.float16 and torch.isfinite(s).all() and (s > 0).all()


def test_registered_options():
    spec = get_method("awq")
    assert spec.needs == {"hessian", "act_norm"}
    cfg = make_config(spec, {"bits": "3", "quant": "gptq", "grid": "10"})
    assert cfg == AWQConfig(bits=3, quant=AWQQuant.GPTQ, grid=10)
    with pytest.raises(SlimlmError):
        make_config(spec, {"quant": "nope"})
    with pytest.raises(SlimlmError, match="needs calibration"):
        spec.fn(torch.randn(4, 8), LayerStats(name="x"), cfg)


def test_tiny_model_end_to_end(tiny, tmp_path):
    x = torch.randint(0, 384, (1, 24))
    compress_model(tiny, "awq:bits=3,group=16", CalibrationConfig(n_windows=4, seq_len=64), progress=False)
    layers = [m for m in tiny.model.modules() if isinstance(m, CompressedLinear)]
    assert len(layers) == 14 and all(isinstance(m.packed, (ScaledQuant, IntQuant)) for m in layers)
    back = load_compressed(save_compressed(tiny, tmp_path / "awq"))
    with torch.no_grad():
        assert torch.equal(back.model(x).logits, tiny.model(x).logits)
