import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.formats.dense import Dense
from slimlm.formats.lowrank import LowRank, breakeven_rank
from slimlm.methods import LayerStats, get_method, make_config
from slimlm.methods.lowrank import activation_scale, rank_for, welore_factors


def _decaying(out, inp, decay, seed=0):
    """A matrix with singular values decay^i (i = 0, 1, ...)."""
    g = torch.Generator().manual_seed(seed)
    r = min(out, inp)
    u, _ = torch.linalg.qr(torch.randn(out, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, r, generator=g, dtype=torch.float64))
    s = decay ** torch.arange(r, dtype=torch.float64)
    return ((u * s) @ v.T).float()


def _run(method, w, stats=None, **opts):
    spec = get_method(method)
    return spec.fn(w, stats or LayerStats(name="l"), make_config(spec, opts))


@pytest.mark.parametrize("shape", [(48, 32), (32, 96), (64, 64)])
@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.3, 0.8])
def test_error_is_norm_of_discarded_singular_values(shape, threshold):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    u, v, sigma = welore_factors(w, threshold)
    k = u.shape[1]
    assert k == rank_for(sigma, threshold) and (sigma[:k] / sigma[0] > threshold).all()
    err = torch.linalg.matrix_norm(w.double() - u @ v)
    assert torch.allclose(err, sigma[k:].pow(2).sum().sqrt(), rtol=1e-6, atol=1e-5)


def test_stored_factors_give_the_same_error():
    w = _decaying(64, 96, 0.8)
    p = _run("welore", w, threshold=0.05, dtype="float32")
    assert isinstance(p, LowRank)
    sigma = torch.linalg.svdvals(w.double())
    k = p.rank
    assert k == int((sigma / sigma[0] > 0.05).sum())
    err = torch.linalg.matrix_norm(w.double() - p.dequantize().double())
    assert abs(float(err) - float(sigma[k:].pow(2).sum().sqrt())) < 1e-4 * float(sigma[0])


@pytest.mark.parametrize("dtype,bits", [("float16", 16), ("bfloat16", 16), ("float32", 32)])
def test_factors_only_when_they_shrink(dtype, bits):
    out, inp = 48, 80  # break-even rank 30
    fast = _decaying(out, inp, 0.5)  # rank 4 above 0.1
    slow = _decaying(out, inp, 0.99)  # every singular value above 0.1: stays dense
    p = _run("welore", fast, threshold=0.1, dtype=dtype)
    assert isinstance(p, LowRank) and p.rank < breakeven_rank(out, inp)
    assert p.nbits() == p.rank * (out + inp) * bits < out * inp * bits
    d = _run("welore", slow, threshold=0.1, dtype=dtype)
    assert isinstance(d, Dense) and d.nbits() == out * inp * bits
    assert torch.equal(d.dequantize(), slow.to(getattr(torch, dtype)).float())
    meta, tensors = p.to_state()
    assert torch.equal(LowRank.from_state(meta, tensors).dequantize(), p.dequantize())


def test_one_threshold_gives_non_uniform_ranks():
    a, b = _decaying(64, 256, 0.6, seed=1), _decaying(64, 256, 0.9, seed=2)  # break-even rank 51.2
    ra = _run("welore", a, threshold=0.02).rank
    rb = _run("welore", b, threshold=0.02).rank
    assert ra == 8 and rb == 38  # 0.6^k > 0.02 for k < 7.66; 0.9^k > 0.02 for k < 37.1


def test_activation_aware_error_in_scaled_norm():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 64, generator=g)
    x = torch.randn(512, 64, generator=g) * torch.rand(64, generator=g).pow(3) * 10
    act = x.pow(2).mean(0).double()
    p = _run("welore_act", w, LayerStats(name="l", act_norm=act), threshold=0.2, dtype="float32")
    s = activation_scale(act)
    sigma = torch.linalg.svdvals(w.double() * s)
    k = p.rank
    err = torch.linalg.matrix_norm((w.double() - p.dequantize().double()) * s)
    assert abs(float(err) - float(sigma[k:].pow(2).sum().sqrt())) < 1e-4 * float(sigma[0])
    # on the inputs it was made for it beats the plain truncation of the same rank
    u, v, _ = welore_factors(w, 0.0)
    plain = (u[:, :k] @ v[:k]).float()
    out_err = lambda m: float(((m - w) @ x.T).pow(2).sum())
    assert out_err(p.dequantize()) < out_err(plain)


def test_config_and_missing_stats():
    spec = get_method("welore")
    with pytest.raises(SlimlmError):
        make_config(spec, {"threshold": "1.5"})
    with pytest.raises(SlimlmError):
        make_config(spec, {"dtype": "int4"})
    with pytest.raises(SlimlmError):
        _run("welore_act", torch.randn(4, 4))


def test_engine_welore_saves_and_loads(tiny, tmp_path):
    import slimlm
    from slimlm.compress import compress_model
    from slimlm.formats.store import save_compressed

    compress_model(tiny, "welore:threshold=0.5,dtype=float32", progress=False)
    kinds = {type(m.packed).__name__ for m in tiny.model.modules() if hasattr(m, "packed")}
    assert "LowRank" in kinds
    save_compressed(tiny, tmp_path / "lr")
    back = slimlm.load(tmp_path / "lr")
    ids = torch.arange(1, 30).unsqueeze(0)
    with torch.inference_mode():
        assert torch.equal(back.model(ids).logits, tiny.model(ids).logits)
