import pytest
import torch

from slimlm.compress import CalibrationConfig, compress_model
from slimlm.errors import SlimlmError
from slimlm.formats import CompressedLinear, IntQuant
from slimlm.formats.store import load_compressed, save_compressed
from slimlm.methods import LayerStats, get_method, make_config
from slimlm.methods._hessian import damped_hessian, gptq_columns, inverse_cholesky
from slimlm.methods.affine import quantize_rtn
from slimlm.methods.gptq import GPTQConfig, gptq_quantize


def correlated(out, inp, n=1024, seed=0):
    """A weight and the mean XᵀX of correlated inputs with one massive channel."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) / inp ** 0.5
    x = torch.randn(n, inp, generator=g) @ mix + 0.2 * torch.randn(n, inp, generator=g)
    x[:, 1] *= 20
    return torch.randn(out, inp, generator=g), (x.T @ x / n).double()


def out_err(w, wq, h):
    d = (w - wq).double()
    return float(((d @ h) * d).sum())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group,shape", [(32, (24, 96)), (0, (16, 64)), (32, (20, 100)), (64, (8, 160))])
@pytest.mark.parametrize("act_order", [False, True])
def test_beats_rtn_and_counts_bits_exactly(bits, group, shape, act_order):
    w, h = correlated(*shape)
    p = gptq_quantize(w, h, bits, group, act_order=act_order)
    assert isinstance(p, IntQuant) and p.shape == shape
    out, inp = shape
    g = group or inp
    assert p.nbits() == 8 * ((out * inp * bits + 7) // 8) + out * (-(-inp // g)) * 32
    assert out_err(w, p.dequantize(), h) < out_err(w, quantize_rtn(w, bits, group).dequantize(), h)


@pytest.mark.parametrize("bits,group,act_order,static", [(3, 16, False, False), (4, 32, True, False),
                                                         (2, 0, False, False), (3, 16, False, True)])
def test_uncorrelated_inputs_reduce_to_rtn(bits, group, act_order, static):
    # H = I: U is diagonal, no error flows between columns, so GPTQ without clipping is RTN
    w, _ = correlated(12, 48)
    p = gptq_quantize(w, torch.eye(48, dtype=torch.float64), bits, group, act_order=act_order, static=static, clip=False)
    r = quantize_rtn(w, bits, group)
    assert torch.equal(p.int_codes(), r.int_codes()) and torch.equal(p.scales, r.scales)


def test_deterministic_and_symmetric():
    w, h = correlated(16, 64)
    a, b = gptq_quantize(w, h, 3, 16), gptq_quantize(w, h, 3, 16)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    s = gptq_quantize(w, h, 4, 32, sym=True)
    assert s.symmetric and s.mins is None
    assert out_err(w, s.dequantize(), h) < out_err(w, quantize_rtn(w, 4, 32, True).dequantize(), h)


def test_dead_columns_are_rounded_plainly():
    w, h = correlated(10, 64)
    dead = [5, 17, 63]
    h[dead, :] = 0
    h[:, dead] = 0
    for act_order in (False, True):
        p = gptq_quantize(w, h, 3, 16, act_order=act_order, static=True, clip=False)
        assert torch.isfinite(p.dequantize()).all()
        # a dead channel neither gives nor takes error: its codes are the plain rounding
        assert torch.equal(p.int_codes()[:, dead], quantize_rtn(w, 3, 16).int_codes()[:, dead])


def test_ill_conditioned_hessian_gets_more_damping():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 64, generator=g)  # rank 8 < 64: singular without damping
    h = (x.T @ x / 8).double()
    u, damp = inverse_cholesky(h, 0.0)
    assert damp > 0 and torch.isfinite(u).all()
    hd, _ = damped_hessian(h, damp)
    assert torch.allclose((u.double().T @ u.double()) @ hd, torch.eye(64, dtype=torch.float64), atol=1e-3)
    w = torch.randn(8, 64, generator=g)
    p = gptq_quantize(w, h, 3, 16, damp=0.0)
    assert torch.isfinite(p.dequantize()).all()
    with pytest.raises(SlimlmError, match="NaN"):
        inverse_cholesky(h * float("nan"))


def test_column_loop_contract():
    w, h = correlated(6, 40)
    u, _ = inverse_cholesky(h)
    # keeping every weight exact: nothing changes, no loss
    q, loss = gptq_columns(w, u, lambda j, cols: cols[:, 0].clone(), block=16)
    assert torch.equal(q, w) and float(loss.abs().max()) == 0
    # the quantizer sees column j after feedback from all columns before it (also across blocks)
    seen = []
    q, loss = gptq_columns(w, u, lambda j, cols: (seen.append(cols.shape[1]), torch.round(cols[:, 0]))[1], block=16)
    assert seen[:3] == [16, 15, 14] and seen[16] == 16 and seen[32] == 8 and seen[-1] == 1 and torch.equal(q, torch.round(q))
    # column 0 is rounded as it is; later columns carry feedback, so they differ from plain rounding
    assert torch.equal(q[:, 0], torch.round(w[:, 0]))
    assert torch.allclose(loss[0], ((w[:, 0] - q[:, 0]) ** 2).sum() / u[0, 0] ** 2)
    assert not torch.equal(q, torch.round(w))


def test_registered_and_refuses_without_statistics():
    spec = get_method("gptq")
    assert spec.needs == {"hessian"}
    cfg = make_config(spec, {"bits": "3", "group": "channel", "act_order": "false"})
    assert cfg == GPTQConfig(bits=3, group=0, act_order=False)
    with pytest.raises(SlimlmError, match="needs calibration"):
        spec.fn(torch.randn(4, 8), LayerStats(name="x"), cfg)
    for bad in ({"bits": "9"}, {"damp": "-1"}, {"block": "0"}):
        with pytest.raises(SlimlmError):
            make_config(spec, bad)


def test_tiny_model_end_to_end(tiny, tmp_path):
    x = torch.randint(0, 384, (1, 24))
    compress_model(tiny, "gptq:bits=3,group=16", CalibrationConfig(n_windows=4, seq_len=64), progress=False)
    layers = [m for m in tiny.model.modules() if isinstance(m, CompressedLinear)]
    assert len(layers) == 14 and all(isinstance(m.packed, IntQuant) for m in layers)
    back = load_compressed(save_compressed(tiny, tmp_path / "gptq"))
    with torch.no_grad():
        assert torch.equal(back.model(x).logits, tiny.model(x).logits)
    assert back.manifest["recipe"] == "gptq:bits=3,group=16"
