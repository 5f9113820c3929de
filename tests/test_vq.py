import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.formats.vq import Codebook, VectorQuant, index_bits, pack_indices, unpack_indices
from slimlm.methods import LayerStats, get_method, make_config
from slimlm.methods._kmeans import layer_loss
from slimlm.methods.affine import quantize_rtn
from slimlm.methods.vq import VQConfig, nearest_entry, refit_codebook, role_of, vector_quantize


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _hessian(inp, seed=0, n=2048):
    g = _gen(seed)
    mix = torch.randn(inp, inp, generator=g) / inp ** 0.5 + torch.eye(inp)
    x = (torch.randn(n, inp, generator=g) @ mix) * torch.linspace(0.1, 3, inp)
    return (x.T @ x / n).double()


# ---- index packing and the format ---------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 3, 8, 9, 12, 16])
@pytest.mark.parametrize("n", [1, 5, 1001])
def test_index_packing_round_trips_in_exact_bytes(bits, n):
    idx = torch.randint(0, 1 << bits, (n,), generator=_gen(bits * n))
    packed = pack_indices(idx, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n * bits // 8)
    assert torch.equal(unpack_indices(packed, bits, n), idx)


def test_index_layout_is_a_little_endian_stream():
    # 12-bit indices 0xABC, 0x123: stream bytes 0xBC, 0x3A, 0x12
    assert pack_indices(torch.tensor([0xABC, 0x123]), 12).tolist() == [0xBC, 0x3A, 0x12]
    assert index_bits(4096) == 12 and index_bits(4097) == 13 and index_bits(2) == 1


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
@pytest.mark.parametrize("dim,inp", [(4, 32), (6, 64), (8, 20)])
def test_vq_is_scaled_codebook_rows_and_counts_every_bit(dtype, dim, inp):
    g = _gen(dim + inp)
    out, k = 5, 64
    book = Codebook.from_float(torch.randn(k, dim, generator=g), dtype)
    nv = -(-inp // dim)
    idx = torch.randint(0, k, (out, nv), generator=g)
    scales = torch.rand(out, generator=g).half()
    p = VectorQuant.from_indices(idx, scales, book, inp)
    want = (book.decoded()[idx].reshape(out, -1)[:, :inp]) * scales.float()[:, None]
    assert torch.equal(p.dequantize(), want) and p.shape == (out, inp)
    book_bits = k * dim * (16 if dtype == "fp16" else 8) + (16 * dim if dtype == "int8" else 0)
    assert book.nbits() == book_bits
    assert p.nbits() == 8 * -(-out * nv * 6 // 8) + 16 * out + book_bits
    meta, tensors = p.to_state()
    assert p.nbits() == sum(t.numel() * t.element_size() * 8 for t in tensors.values())
    q = VectorQuant.from_state(meta, tensors)
    assert torch.equal(q.dequantize(), p.dequantize()) and q.nbits() == p.nbits()
    # a layer sharing the codebook stores and counts none of it
    other = VectorQuant.from_indices(idx.flip(0), scales, book, inp, owner=False)
    meta2, tensors2 = other.to_state()
    assert set(tensors2) == {"indices", "scales"} and other.nbits() == p.nbits() - book_bits
    assert torch.equal(VectorQuant.from_state(meta2, tensors2).dequantize(), other.dequantize())


def test_shared_codebook_needs_its_owner_and_corruption_is_refused():
    book = Codebook.from_float(torch.randn(16, 4, generator=_gen(1)) + 100)  # bytes no other test makes
    p = VectorQuant.from_indices(torch.zeros(3, 2, dtype=torch.long), torch.ones(3).half(), book, 8, owner=False)
    meta, tensors = p.to_state()
    del book, p
    with pytest.raises(SlimlmError, match="earlier layer"):
        VectorQuant.from_state(meta, tensors)
    owner = VectorQuant.from_indices(torch.zeros(3, 2, dtype=torch.long), torch.ones(3).half(),
                                     Codebook.from_float(torch.randn(16, 4)), 8)
    m, t = owner.to_state()
    with pytest.raises(SlimlmError, match="corrupt"):
        VectorQuant.from_state(m, {**t, "codebook": t["codebook"] + 1})
    with pytest.raises(SlimlmError, match="bytes"):
        VectorQuant.from_state(m, {**t, "indices": t["indices"][:-1]})
    with pytest.raises(SlimlmError, match="incomplete"):
        VectorQuant.from_state(m, {"indices": t["indices"]})


# ---- the method ---------------------------------------------------------------------------------


def test_without_feedback_each_vector_takes_the_weighted_nearest_entry():
    w = torch.randn(12, 30, generator=_gen(2))
    h = _hessian(30)
    cfg = VQConfig(bits=2, dim=4, share="none", feedback=False, iters=3)
    p = vector_quantize(w, h, cfg)
    cb, s = p.codebook.decoded(), p.scales.float()
    # brute force over every entry, with the scales the codes were chosen under (row RMS)
    s0 = w.pow(2).mean(1).sqrt().half().float()
    x = torch.cat([w / s0[:, None], torch.zeros(12, 2)], 1).view(12, 8, 4)
    d = torch.cat([torch.diag(h).float(), torch.zeros(2)]).view(8, 4)
    dist = (d[None, :, None, :] * (x[:, :, None, :] - cb[None, None]) ** 2).sum(-1)  # (out, V, k)
    best = dist.min(-1).values
    got = dist.gather(-1, p.int_indices()[..., None]).squeeze(-1)
    assert torch.allclose(got, best, rtol=1e-5, atol=1e-6)
    assert s.shape == (12,)


def test_feedback_lowers_the_layer_loss_and_beats_scalar_rtn():
    h = _hessian(96, seed=3)
    w = torch.randn(128, 96, generator=_gen(4)) * 0.02
    cfg = VQConfig(bits=2, dim=4, share="none", iters=10)
    plain = vector_quantize(w, h, VQConfig(bits=2, dim=4, share="none", iters=10, feedback=False))
    fb = vector_quantize(w, h, cfg)
    rtn = quantize_rtn(w, 2, 32)  # 3 bits per weight
    assert layer_loss(w, fb.dequantize(), h) < layer_loss(w, plain.dequantize(), h)
    assert layer_loss(w, fb.dequantize(), h) < layer_loss(w, rtn.dequantize(), h)
    assert fb.nbits() - fb.codebook.nbits() < rtn.nbits()  # with the codebook shared by other layers


def test_nearest_entry_is_the_brute_force_argmin_across_chunks():
    g = _gen(10)
    x, c = torch.randn(150, 3, generator=g), torch.randn(512, 3, generator=g)
    want = torch.cdist(x.double(), c.double()).argmin(1)
    assert torch.equal(nearest_entry(x, c, chunk=64), want) and torch.equal(nearest_entry(x, c, chunk=1000), want)


def test_codebook_refit_is_least_squares_for_fixed_indices():
    h = _hessian(30, seed=6)
    w = torch.randn(20, 30, generator=_gen(7))
    p = vector_quantize(w, h, VQConfig(bits=2, dim=4, share="none", iters=3, keep=0))
    idx, s, cb = p.int_indices(), p.scales.float(), p.codebook.decoded()
    cb = torch.cat([cb[:-1], torch.full((1, 4), 7.0)])  # an entry no vector uses (256 entries, 160 vectors)
    idx = idx.clamp(max=cb.shape[0] - 2)
    c = refit_codebook(w, h, idx, s, cb)
    assert torch.equal(c[-1], cb[-1])  # unused: left where it was

    def loss(entries):
        return layer_loss(w, entries[idx].reshape(20, -1)[:, :30] * s[:, None], h)

    # the gradient of the loss in the entries vanishes: no entry can move to lower it
    cd = c.double().requires_grad_()
    e = w.double() - cd[idx].reshape(20, -1)[:, :30] * s.double()[:, None]
    ((e @ h) * e).sum().backward()
    assert cd.grad.abs().max() < 1e-6 * float((w.double() @ h * w.double()).sum())
    assert loss(c) < loss(cb)


def test_codebook_refit_rounds_lower_the_layer_loss_and_keep_the_bits():
    h = _hessian(64, seed=8)
    w = torch.randn(96, 64, generator=_gen(9))
    losses, bits = [], set()
    for refit in (0, 1, 2):
        p = vector_quantize(w, h, VQConfig(bits=3, dim=2, share="none", iters=4, keep=0, refit=refit))
        losses.append(layer_loss(w, p.dequantize(), h))
        bits.add(p.nbits())
    assert losses[1] < losses[0] and losses[2] < losses[0] and len(bits) == 1
    with pytest.raises(SlimlmError, match="refit"):
        VQConfig(refit=11)


def test_vq_is_deterministic_with_a_seed():
    w, h = torch.randn(16, 32, generator=_gen(5)), _hessian(32)
    cfg = VQConfig(bits=2, dim=4, share="none", iters=3)
    a, b = vector_quantize(w, h, cfg, seed=1), vector_quantize(w, h, cfg, seed=1)
    assert torch.equal(a.dequantize(), b.dequantize()) and a.codebook.id == b.codebook.id


def test_role_of_strips_the_block_index():
    assert role_of("model.layers.12.mlp.up_proj") == "model.layers.*.mlp.up_proj"
    assert role_of("model.layers.3.self_attn.q_proj") == role_of("model.layers.0.self_attn.q_proj")


def _run(names, options, weights):
    spec = get_method("vq")
    cfg = make_config(spec, options)
    return [spec.fn(w, LayerStats(name=n, hessian=_hessian(w.shape[1], i)), cfg)
            for i, (n, w) in enumerate(zip(names, weights))]


def test_layers_of_one_role_share_one_codebook_counted_once():
    ws = [torch.randn(8, 16, generator=_gen(i)) for i in range(4)]
    names = ["m.layers.0.q", "m.layers.0.k", "m.layers.1.q", "m.layers.1.k"]
    opts = {"bits": "2", "dim": "4", "iters": "2", "share": "role", "keep": "0"}
    packed = _run(names, opts, ws)
    q0, k0, q1, k1 = packed
    assert q0.owner and k0.owner and not q1.owner and not k1.owner
    assert q1.codebook is q0.codebook and k1.codebook is k0.codebook and q0.codebook is not k0.codebook
    book = q0.codebook.nbits()
    assert sum(p.nbits() for p in packed) == 2 * book + sum(p.nbits() - (book if p.owner else 0) for p in packed)
    # the same model compressed again: the repeated names start new codebooks
    again = _run(names[:1], opts, ws[:1])[0]
    assert again.owner
    # one codebook for all, or one per layer
    assert [p.owner for p in _run(names, {**opts, "share": "all"}, ws)] == [True, False, False, False]
    assert all(p.owner for p in _run(names, {**opts, "share": "none"}, ws))
    # with columns kept apart the inner VectorQuants share the same way, and bits still add up
    kq0, kk0, kq1, kk1 = _run(names, {**opts, "keep": "1"}, ws)
    assert kq1.inner.codebook is kq0.inner.codebook and kq0.inner.owner and not kq1.inner.owner
    assert kq1.nbits() == kq1.inner.nbits() + 16 + 16 * 8 and kq1.inner.nbits() == 8 * 4 * 8 + 16 * 8  # 8 rows × ceil(15 / 4) 8-bit indices + scales


@pytest.mark.parametrize("out,inp", [(576, 576), (192, 576), (1536, 576), (576, 1536)])
def test_default_bits_per_weight_on_the_embedded_shapes(out, inp):
    # defaults: 8-bit indices per 4 weights, fp16 row scales, a 256 × 4 fp16 codebook per layer
    cfg = VQConfig()
    book = Codebook.from_float(torch.randn(cfg.size, cfg.dim))
    idx = torch.randint(0, cfg.size, (out, inp // cfg.dim))
    p = VectorQuant.from_indices(idx, torch.ones(out).half(), book, inp)
    assert p.nbits() == 8 * out * inp // 4 + 16 * out + 256 * 4 * 16
    assert p.nbits() / (out * inp) <= 2.3
    # with the codebook shared by a role's 30 layers: ≤ 2.04
    assert (30 * (p.nbits() - book.nbits()) + book.nbits()) / (30 * out * inp) <= 2.04


def test_check_refuses_a_per_layer_codebook_larger_than_the_layer():
    spec = get_method("vq")
    with pytest.raises(SlimlmError, match="exceeds"):
        spec.check(make_config(spec, {"share": "none"}), (16, 16))
    with pytest.raises(SlimlmError):
        VQConfig(bits=3, dim=8)


def test_tiny_model_end_to_end_with_shared_codebooks(tiny, tmp_path):
    from slimlm.compress import CalibrationConfig, compress_model
    from slimlm.formats.store import load_compressed, save_compressed

    ids = tiny.tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    compress_model(tiny, "vq:bits=2,share=role,iters=4,keep=1", CalibrationConfig(n_windows=2, seq_len=32), progress=False)
    with torch.no_grad():
        got = tiny.model(ids).logits
    assert torch.isfinite(got).all()
    save_compressed(tiny, tmp_path / "m")
    back = load_compressed(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back.model(ids).logits, got)
    layers = back.manifest["layers"]
    assert all(e["format"] == "keptcols" and len(e["meta"]["inner"]) > 0 for e in layers.values())
    owners = [n for n, e in layers.items() if e["meta"]["inner"]["owner"]]
    roles = {role_of(n) for n in layers}
    assert len(owners) == len(roles) == 7 and all(".0." in n for n in owners)
    # the bits counted are the bytes stored: each codebook once
    from safetensors.torch import load_file

    stored = sum(t.numel() * t.element_size() * 8 for t in load_file(str(tmp_path / "m" / "packed.safetensors")).values())
    assert stored == sum(e["nbits"] for e in layers.values())


@pytest.mark.parametrize("dim,inp", [(4, 30), (3, 20), (5, 5)])
def test_feedback_with_a_short_last_vector(dim, inp):
    w = torch.randn(9, inp, generator=_gen(dim * inp))
    h = _hessian(inp, seed=dim)
    p = vector_quantize(w, h, VQConfig(bits=2, dim=dim, share="none", iters=3, k=16))
    assert p.shape == (9, inp) and p.int_indices().shape == (9, -(-inp // dim))
    cb = p.codebook.decoded()
    want = cb[p.int_indices()].reshape(9, -1)[:, :inp] * p.scales.float()[:, None]
    assert torch.equal(p.dequantize(), want)
    zero = layer_loss(w, torch.zeros_like(w), h)
    assert layer_loss(w, p.dequantize(), h) < zero
