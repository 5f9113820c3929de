import pytest
import torch

from slimlm.compress import CalibrationConfig, compress_model
from slimlm.errors import SlimlmError
from slimlm.formats import CompressedLinear, format_class
from slimlm.formats.spqr import SpQRQuant
from slimlm.formats.store import load_compressed, save_compressed
from slimlm.methods import LayerStats, get_method, make_config
from slimlm.methods.affine import quantize_rtn
from slimlm.methods.gptq import gptq_quantize
from slimlm.methods.spqr import SpQRConfig, spqr_quantize


def correlated(out, inp, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) / inp ** 0.5
    x = torch.randn(n, inp, generator=g) @ mix + 0.2 * torch.randn(n, inp, generator=g)
    x[:, 1] *= 20
    return torch.randn(out, inp, generator=g), (x.T @ x / n).double()


def out_err(w, wq, h):
    d = (w - wq).double()
    return float(((d @ h) * d).sum())


def expected_bits(out, inp, cfg, k):
    g, r = -(-inp // cfg.group), -(-out // min(cfg.stat_group, out))
    packed = lambda n, b: 8 * ((n * b + 7) // 8)  # noqa: E731
    return packed(out * inp, cfg.bits) + 2 * packed(g * out, cfg.stat_bits) + 4 * g * r * 16 + 48 * k


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(24, 96), (20, 100), (70, 64)])
@pytest.mark.parametrize("act_order", [False, True])
def test_bits_exact_and_beats_rtn(bits, shape, act_order):
    w, h = correlated(*shape)
    cfg = SpQRConfig(bits=bits, outliers=0.01, act_order=act_order, stat_group=32)
    p = spqr_quantize(w, h, cfg)
    out, inp = shape
    assert 0 < p.n_outliers() <= int(0.01 * out * inp)
    assert p.nbits() == expected_bits(out, inp, cfg, p.n_outliers())
    assert out_err(w, p.dequantize(), h) < out_err(w, quantize_rtn(w, bits, 16).dequantize(), h)


def test_defaults_stay_within_half_a_bit():
    w, h = correlated(64, 576)
    p = spqr_quantize(w, h)  # spqr:bits=3
    bpw = p.nbits() / w.numel()
    assert p.n_outliers() <= int(0.001 * w.numel()) and bpw <= 3.5
    # equal bits: better than GPTQ with groups of 64 (3.5 bpw)
    assert out_err(w, p.dequantize(), h) < out_err(w, gptq_quantize(w, h, 3, 64).dequantize(), h)


def test_outliers_are_stored_and_restored():
    w, h = correlated(16, 64, seed=4)
    planted = [(2, 7), (9, 40), (15, 63)]
    for r, c in planted:
        w[r, c] = 50.0 + r  # far outside every group's range
    p = spqr_quantize(w, h, SpQRConfig(bits=3, outliers=0.01))
    idx = set(p.outlier_idx.tolist())
    assert {r * 64 + c for r, c in planted} <= idx
    assert p.outlier_idx.tolist() == sorted(idx)
    dq = p.dequantize()
    for r, c in planted[1:]:  # restored to fp16 (the weight after earlier columns' feedback)
        assert abs(float(dq[r, c]) - w[r, c].item()) < 0.5
    # the outliers left the ranges: every other weight of those groups sits on a fine grid
    s, _ = p.stats()
    assert float(s.max()) < 5


def test_no_outliers_and_determinism():
    w, h = correlated(12, 48)
    cfg = SpQRConfig(bits=3, outliers=0.0)
    a, b = spqr_quantize(w, h, cfg), spqr_quantize(w, h, cfg)
    assert a.n_outliers() == 0 and a.nbits() == expected_bits(12, 48, cfg, 0)
    assert all(torch.equal(x, y) for x, y in zip(a.to_state()[1].values(), b.to_state()[1].values()))


def test_dead_columns_and_ill_conditioning():
    w, h = correlated(10, 64)
    h[[3, 30], :] = 0
    h[:, [3, 30]] = 0
    p = spqr_quantize(w, h, SpQRConfig(bits=3, outliers=0.01))
    assert torch.isfinite(p.dequantize()).all()
    x = torch.randn(6, 64)
    p = spqr_quantize(w, (x.T @ x).double(), SpQRConfig(bits=3, damp=0.0, act_order=False))
    assert torch.isfinite(p.dequantize()).all()


def test_format_state_and_refusals():
    w, h = correlated(8, 32)
    p = spqr_quantize(w, h, SpQRConfig(bits=4, outliers=0.02))
    meta, tensors = p.to_state()
    back = format_class("spqr").from_state(meta, tensors)
    assert torch.equal(back.dequantize(), p.dequantize())
    bad = dict(tensors, outlier_idx=torch.tensor([10 ** 6] * p.n_outliers(), dtype=torch.int32))
    with pytest.raises(SlimlmError, match="outside"):
        SpQRQuant(**meta, **bad)
    with pytest.raises(SlimlmError, match="codes"):
        SpQRQuant(**meta, **dict(tensors, codes=tensors["codes"][:-1]))
    with pytest.raises(SlimlmError, match="corrupt"):
        format_class("spqr").from_state(meta, {"codes": tensors["codes"]})


def test_registered_options():
    spec = get_method("spqr")
    cfg = make_config(spec, {"bits": "3", "outliers": "0.005"})
    assert cfg == SpQRConfig(bits=3, outliers=0.005)
    for bad in ({"outliers": "0.5"}, {"stat_bits": "1"}, {"group": "0"}):
        with pytest.raises(SlimlmError):
            make_config(spec, bad)
    with pytest.raises(SlimlmError, match="needs calibration"):
        spec.fn(torch.randn(4, 8), LayerStats(name="x"), cfg)


def test_tiny_model_end_to_end(tiny, tmp_path):
    x = torch.randint(0, 384, (1, 24))
    compress_model(tiny, "spqr:bits=3", CalibrationConfig(n_windows=4, seq_len=64), progress=False)
    layers = [m for m in tiny.model.modules() if isinstance(m, CompressedLinear)]
    assert len(layers) == 14 and all(isinstance(m.packed, SpQRQuant) for m in layers)
    back = load_compressed(save_compressed(tiny, tmp_path / "spqr"))
    with torch.no_grad():
        assert torch.equal(back.model(x).logits, tiny.model(x).logits)
