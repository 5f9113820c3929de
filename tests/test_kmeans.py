import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.formats import bitpack
from slimlm.formats.palette import Palette
from slimlm.methods._kmeans import grouped_kmeans_1d, layer_loss, nearest_level, weighted_kmeans
from slimlm.methods.affine import quantize_rtn
from slimlm.methods.kmeans import KMeansConfig, palettize, refit_levels


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _hessian(inp, seed=0, n=2048):
    """A correlated, unevenly scaled input second moment, as real activations give."""
    g = _gen(seed)
    mix = torch.randn(inp, inp, generator=g) / inp ** 0.5 + torch.eye(inp)
    x = (torch.randn(n, inp, generator=g) @ mix) * torch.linspace(0.1, 3, inp)
    return (x.T @ x / n).double()


# ---- k-means primitives -------------------------------------------------------------------------


def test_weighted_kmeans_converges_monotonically_and_finds_separated_clusters():
    g = _gen(1)
    centers = torch.randn(8, 3, generator=g) * 10
    x = centers.repeat_interleave(50, 0) + 0.01 * torch.randn(400, 3, generator=g)
    c, a, hist = weighted_kmeans(x, torch.rand(400, 3, generator=g) + 0.5, 8, iters=20, seed=0)
    assert all(b <= h * (1 + 1e-5) + 1e-6 for h, b in zip(hist, hist[1:]))  # never increases
    # every true center is matched by a centroid and every point sits with its cluster
    assert torch.cdist(centers, c).min(1).values.max() < 0.05
    assert (a.view(8, 50) == a.view(8, 50)[:, :1]).all()


def test_weighted_kmeans_is_deterministic_with_a_seed():
    x = torch.randn(500, 4, generator=_gen(2))
    c1, a1, _ = weighted_kmeans(x, None, 16, iters=5, seed=3)
    c2, a2, _ = weighted_kmeans(x, None, 16, iters=5, seed=3)
    c3, _, _ = weighted_kmeans(x, None, 16, iters=5, seed=4)
    assert torch.equal(c1, c2) and torch.equal(a1, a2)
    assert not torch.equal(c1, c3)


def test_weighted_kmeans_weights_pull_centroids():
    # one cluster, two points: the centroid is the weighted mean per coordinate
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    w = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    c, _, _ = weighted_kmeans(x, w, 1, iters=2)
    assert torch.allclose(c, torch.tensor([[0.75, 0.25]]))


@pytest.mark.parametrize("k", [2, 4, 8])
def test_grouped_kmeans_1d_reproduces_data_with_k_values_exactly(k):
    g = _gen(k)
    levels = torch.randn(5, k, generator=g).sort(1).values
    codes = torch.arange(k).repeat(40)[torch.randperm(40 * k, generator=g)].expand(5, -1)  # equal counts
    x = levels.gather(1, codes)
    got, c, hist = grouped_kmeans_1d(x, None, k, iters=5)
    assert torch.allclose(got, levels) and torch.allclose(got.gather(1, c), x) and hist[-1] < 1e-9


def test_grouped_kmeans_1d_objective_never_increases():
    x = torch.randn(3, 1000, generator=_gen(5)) ** 3
    w = torch.rand(3, 1000, generator=_gen(6))
    levels, codes, hist = grouped_kmeans_1d(x, w, 8, iters=15)
    assert all(b <= h * (1 + 1e-5) for h, b in zip(hist, hist[1:]))
    assert (levels[:, 1:] >= levels[:, :-1]).all()
    assert torch.equal(codes, nearest_level(x, levels))


# ---- the Palette format -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("rows", [0, 1, 3])
@pytest.mark.parametrize("shape", [(7, 10), (12, 64)])
def test_palette_is_lut_of_codes_and_counts_every_bit(bits, rows, shape):
    out, inp = shape
    g = _gen(bits * 10 + rows)
    t = -(-out // rows) if rows else 1
    lut = torch.randn(t, 1 << bits, generator=g).half()
    codes = torch.randint(0, 1 << bits, shape, generator=g).to(torch.uint8)
    p = Palette.from_codes(codes, lut, bits, rows)
    table = torch.arange(out) // rows if rows else torch.zeros(out, dtype=torch.long)
    assert torch.equal(p.dequantize(), lut.float()[table[:, None], codes.long()])
    assert p.nbits() == 8 * bitpack.packed_nbytes(out * inp, bits) + t * (1 << bits) * 16
    meta, tensors = p.to_state()
    assert p.nbits() == sum(x.numel() * x.element_size() * 8 for x in tensors.values())
    q = Palette.from_state(meta, tensors)
    assert torch.equal(q.dequantize(), p.dequantize()) and q.nbits() == p.nbits()


def test_palette_refuses_corrupt_state():
    p = Palette.from_codes(torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(1, 4), 2, 0)
    meta, tensors = p.to_state()
    with pytest.raises(SlimlmError, match="bytes"):
        Palette.from_state(meta, {**tensors, "codes": tensors["codes"][:-1]})
    with pytest.raises(SlimlmError, match="lookup tables"):
        Palette.from_state(meta, {**tensors, "lut": torch.zeros(2, 4).half()})
    with pytest.raises(SlimlmError, match="incomplete"):
        Palette.from_state(meta, {"codes": tensors["codes"]})


# ---- the method ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rows", [0, 1, 5])
def test_palettize_without_feedback_picks_the_nearest_level(bits, rows):
    w = torch.randn(10, 48, generator=_gen(bits + rows))
    p = palettize(w, _hessian(48), KMeansConfig(bits=bits, rows=rows, feedback=False, iters=5))
    lut = p.lut.float()[p.table_of_row()]  # (out, K)
    best = (w[:, :, None] - lut[:, None, :]).abs().min(-1).values
    assert torch.equal((p.dequantize() - w).abs(), best)
    assert p.rows == (rows if rows < 10 else 0)


def test_feedback_lowers_the_layer_loss_and_beats_rtn_at_fewer_bits():
    h = _hessian(128, seed=7)
    w = torch.randn(64, 128, generator=_gen(8)) * 0.02
    plain = palettize(w, h, KMeansConfig(bits=3, feedback=False))
    fb = palettize(w, h, KMeansConfig(bits=3))
    rtn = quantize_rtn(w, 3, 64)  # 3.5 bits per weight
    assert fb.nbits() == plain.nbits() < rtn.nbits()
    assert layer_loss(w, fb.dequantize(), h) < layer_loss(w, plain.dequantize(), h)
    assert layer_loss(w, fb.dequantize(), h) < layer_loss(w, rtn.dequantize(), h)


@pytest.mark.parametrize("bits,rows", [(2, 3), (3, 0), (5, 4)])
def test_level_refit_is_least_squares_for_fixed_codes(bits, rows):
    h = _hessian(40, seed=bits)
    w = torch.randn(10, 40, generator=_gen(bits + rows))
    p = palettize(w, h, KMeansConfig(bits=bits, rows=rows, refit=0))
    table, codes = p.table_of_row(), p.int_codes().long()
    levels, new_codes = refit_levels(w, h, codes, table, p.lut.float())
    q = levels[table].gather(1, new_codes)
    assert (levels[:, 1:] >= levels[:, :-1]).all()
    assert layer_loss(w, q, h) <= layer_loss(w, p.dequantize(), h) * (1 + 1e-3)
    # codes are only renumbered: per table, a one-to-one map from old code to new code
    t_of = table[:, None].expand_as(codes)
    mapping = torch.full((levels.shape[0], 1 << bits), -1, dtype=torch.long)
    mapping[t_of, codes] = new_codes
    assert torch.equal(mapping[t_of, codes], new_codes)
    for row in mapping:
        used = row[row >= 0]
        assert used.unique().numel() == used.numel()


def test_feedback_output_lies_on_the_tables_and_no_hessian_works():
    w = torch.randn(9, 40, generator=_gen(9))
    p = palettize(w, _hessian(40), KMeansConfig(bits=2, rows=4))
    lut = p.lut.float()[p.table_of_row()]
    assert ((p.dequantize()[:, :, None] == lut[:, None, :]).any(-1)).all()
    q = palettize(w, None, KMeansConfig(bits=2, rows=4))
    assert q.nbits() == p.nbits()


@pytest.mark.parametrize("inp,expect", [(576, 3.056), (1536, 3.021)])
def test_default_bits_per_weight_on_the_embedded_shapes(inp, expect):
    w = torch.randn(192, inp, generator=_gen(inp))
    p = palettize(w, None, KMeansConfig(iters=1))
    assert p.nbits() / w.numel() == pytest.approx(expect, abs=1e-3) and p.nbits() / w.numel() <= 3.1


def test_config_is_validated():
    with pytest.raises(SlimlmError):
        KMeansConfig(bits=9)
    with pytest.raises(SlimlmError):
        KMeansConfig(rows=-1)


def test_tiny_model_end_to_end(tiny, tmp_path):
    from slimlm.compress import CalibrationConfig, compress_model
    from slimlm.formats.store import load_compressed, save_compressed

    ids = tiny.tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = tiny.model(ids).logits
    compress_model(tiny, "kmeans:bits=3", CalibrationConfig(n_windows=2, seq_len=32), progress=False)
    with torch.no_grad():
        got = tiny.model(ids).logits
    assert torch.isfinite(got).all() and not torch.equal(got, ref)
    save_compressed(tiny, tmp_path / "m")
    back = load_compressed(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back.model(ids).logits, got)
    layers = back.manifest["layers"]
    assert layers and all(e["format"] == "palette" for e in layers.values())
