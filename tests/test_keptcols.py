import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.formats.base import format_class
from slimlm.formats.keptcols import KeptColumns
from slimlm.methods import LayerStats, get_method, make_config
from slimlm.methods._keep import top_columns, with_kept_columns
from slimlm.methods._kmeans import layer_loss
from slimlm.methods.affine import quantize_rtn


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _massive_hessian(inp, hot=(3, 17), seed=0, n=4096):
    """Correlated inputs with a few channels ~100× louder, as the embedded model's massive activations."""
    g = _gen(seed)
    x = torch.randn(n, inp, generator=g) @ (torch.randn(inp, inp, generator=g) / inp ** 0.5 + torch.eye(inp))
    x[:, list(hot)] *= 100
    return (x.T @ x / n).double()


def _stored_bits(p):
    return sum(t.numel() * t.element_size() * 8 for t in p.to_state()[1].values())


def test_format_places_columns_counts_every_bit_and_round_trips():
    g = _gen(1)
    w = torch.randn(6, 40, generator=g)
    cols = torch.tensor([31, 2, 9])
    rest = torch.tensor([c for c in range(40) if c not in (2, 9, 31)])
    inner = quantize_rtn(w[:, rest], 4, 37)
    p = KeptColumns.from_parts(inner, cols, w[:, cols])
    want = torch.empty_like(w)
    want[:, rest] = inner.dequantize()
    want[:, cols] = w[:, cols].half().float()
    assert p.shape == (6, 40) and torch.equal(p.dequantize(), want)
    assert p.cols.tolist() == [2, 9, 31]
    assert p.nbits() == inner.nbits() + 16 * 3 + 16 * 6 * 3 == _stored_bits(p)
    meta, tensors = p.to_state()
    back = format_class("keptcols").from_state(meta, tensors)
    assert torch.equal(back.dequantize(), p.dequantize()) and back.nbits() == p.nbits()


def test_format_refuses_corrupt_state():
    w = torch.randn(4, 16)
    p = KeptColumns.from_parts(quantize_rtn(w[:, 1:], 4, 15), torch.tensor([0]), w[:, :1])
    meta, tensors = p.to_state()
    with pytest.raises(SlimlmError):
        KeptColumns.from_state(meta, {**tensors, "cols": torch.tensor([16], dtype=torch.int16)})
    with pytest.raises(SlimlmError):
        KeptColumns.from_state(meta, {**tensors, "values": tensors["values"].float()})
    with pytest.raises(SlimlmError):
        KeptColumns.from_state(meta, {k: v for k, v in tensors.items() if k != "cols"})


def test_kept_columns_are_the_loudest_and_absorb_the_error_optimally():
    inp = 48
    h = _massive_hessian(inp)
    w = torch.randn(10, inp, generator=_gen(2))
    assert top_columns(h, 2).tolist() == [3, 17]
    p = with_kept_columns(w, h, 2, lambda wr, hr: quantize_rtn(wr, 2, wr.shape[1]))
    assert p.cols.tolist() == [3, 17] and p.inner.shape == (10, inp - 2)
    # the kept values minimise the loss for the fixed inner code: the zero of ∂/∂E_K tr(E H Eᵀ) = 2 (E H)[:, K]
    q = p.dequantize().double()
    e_r = w.double() - q
    e_r[:, [3, 17]] = 0
    k, r = [3, 17], [c for c in range(inp) if c not in (3, 17)]
    e_k = -torch.linalg.solve(h[k][:, k], (e_r[:, r] @ h[r][:, k]).T).T  # (out, 2) the continuous optimum
    best = q.clone()
    best[:, k] = w[:, k].double() - e_k
    assert layer_loss(w, p.dequantize(), h) == pytest.approx(layer_loss(w, best, h), rel=1e-3)  # fp16 rounding only
    plain = p.dequantize().clone()
    plain[:, [3, 17]] = w[:, [3, 17]].half().float()
    assert layer_loss(w, p.dequantize(), h) < layer_loss(w, plain, h)


def test_no_hessian_or_keep_zero_is_the_inner_method_unchanged():
    w = torch.randn(5, 32, generator=_gen(3))
    code = lambda wr, hr: quantize_rtn(wr, 3, 32)  # noqa: E731
    assert type(with_kept_columns(w, None, 2, code)).__name__ == "IntQuant"
    assert type(with_kept_columns(w, _massive_hessian(32), 0, code)).__name__ == "IntQuant"


@pytest.mark.parametrize("method,options", [("vq", {"bits": "2", "dim": "4", "k": "16", "iters": "3"}),
                                            ("kmeans", {"bits": "3", "iters": "3"})])
def test_keeping_massive_columns_lowers_the_loss_and_is_deterministic(method, options):
    inp = 64
    h = _massive_hessian(inp, seed=4)
    w = torch.randn(32, inp, generator=_gen(5))
    spec = get_method(method)
    stats = lambda: LayerStats(name="m.layers.0.mlp.down_proj", hessian=h, seed=7)  # noqa: E731
    plain = spec.fn(w, stats(), make_config(spec, {**options, "keep": "0"}))
    kept = spec.fn(w, stats(), make_config(spec, {**options, "keep": "2"}))
    again = spec.fn(w, stats(), make_config(spec, {**options, "keep": "2"}))
    assert torch.equal(kept.dequantize(), again.dequantize())
    assert kept.nbits() == kept.inner.nbits() + 16 * 2 + 16 * 32 * 2 == _stored_bits(kept)
    assert layer_loss(w, kept.dequantize(), h) < layer_loss(w, plain.dequantize(), h)


def test_check_refuses_keeping_every_column():
    for method in ("vq", "kmeans"):
        spec = get_method(method)
        with pytest.raises(SlimlmError, match="keep"):
            spec.check(make_config(spec, {"keep": "16", "k": "4"} if method == "vq" else {"keep": "16"}), (8, 16))


@pytest.mark.parametrize("out,inp", [(576, 576), (192, 576), (1536, 576), (576, 1536)])
def test_defaults_with_kept_columns_stay_within_the_issue_budgets(out, inp):
    from slimlm.formats.palette import Palette
    from slimlm.formats.vq import Codebook, VectorQuant
    from slimlm.methods.kmeans import KMeansConfig
    from slimlm.methods.vq import VQConfig

    g = _gen(out + inp)
    cfg = VQConfig()
    n = cfg.keep
    rest = inp - n
    book = Codebook.from_float(torch.randn(cfg.size, cfg.dim, generator=g))
    idx = torch.randint(0, cfg.size, (out, -(-rest // cfg.dim)), generator=g)
    vq = KeptColumns.from_parts(VectorQuant.from_indices(idx, torch.ones(out).half(), book, rest),
                                torch.arange(n), torch.zeros(out, n))
    assert vq.nbits() == 8 * out * -(-rest // 4) + 16 * out + 256 * 4 * 16 + 16 * n + 16 * out * n == _stored_bits(vq)
    assert vq.nbits() / (out * inp) <= 2.3
    km = KMeansConfig(keep=2)
    pal = Palette.from_codes(torch.randint(0, 8, (out, inp - 2), generator=g, dtype=torch.uint8),
                             torch.randn(out // km.rows, 8, generator=g), km.bits, km.rows)
    kept = KeptColumns.from_parts(pal, torch.tensor([0, 5]), torch.zeros(out, 2))
    assert kept.nbits() == 3 * out * (inp - 2) + 16 * 8 * out // 4 + 32 + 32 * out == _stored_bits(kept)
    assert kept.nbits() / (out * inp) <= 3.101  # the model's mix of 576- and 1536-wide layers averages 3.085
