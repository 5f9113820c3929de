import math

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.formats.intq import IntQuant
from slimlm.formats.sparse import Sparse, decode_nm, encode_nm, nm_code_bits
from slimlm.methods import LayerStats, get_method, make_config
from slimlm.methods.affine import quantize_rtn
from slimlm.methods.magnitude import keep_mask, parse_sparsity
from slimlm.methods.sparsegpt import sparsegpt_prune

PATTERNS = ["0.25", "0.5", "0.7", "2:4", "4:8", "1:4"]
METHODS = ["magnitude", "wanda", "sparsegpt"]


def _data(out=24, inp=64, seed=0, correlated=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    x = torch.randn(1024, inp, generator=g)
    if correlated:  # mixed channels with uneven energy, as in real layers
        x = x @ torch.randn(inp, inp, generator=g) * torch.rand(inp, generator=g) * 4
    stats = LayerStats(name="layer", hessian=(x.T @ x).double() / x.shape[0], act_norm=x.pow(2).mean(0).double())
    return w, x, stats


def _prune(method, w, stats, **opts):
    spec = get_method(method)
    return spec.fn(w, stats, make_config(spec, opts))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_sparsity_pattern_exact(method, pattern):
    w, _, stats = _data()
    p = _prune(method, w, stats, sparsity=pattern, values="float32")
    mask = p.mask()
    frac, nm = parse_sparsity(pattern)
    if nm:
        n, m = nm
        assert (mask.reshape(-1, m).sum(1) == n).all()  # N:M holds in every group
    elif method == "wanda":
        assert (mask.sum(1) == w.shape[1] - round(frac * w.shape[1])).all()  # per output row
    elif method == "magnitude":
        assert int((~mask).sum()) == round(frac * w.numel())  # per layer
    else:  # sparsegpt: per block of columns (one block here)
        assert int((~mask).sum()) == round(frac * w.numel())
    dq = p.dequantize()
    assert (dq[~mask] == 0).all()
    if method != "sparsegpt":  # no update: kept weights are the originals
        assert torch.equal(dq[mask], w[mask])


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("values", ["float16", "bfloat16", "float32"])
def test_round_trip_and_bit_count(pattern, values):
    w, _, stats = _data(seed=1)
    p = _prune("magnitude", w, stats, sparsity=pattern, values=values)
    meta, tensors = p.to_state()
    q = Sparse.from_state(meta, tensors)
    assert torch.equal(q.dequantize(), p.dequantize())
    assert p.nbits() == sum(t.numel() * t.element_size() * 8 for t in tensors.values())
    vbits = {"float16": 16, "bfloat16": 16, "float32": 32}[values]
    _, nm = parse_sparsity(pattern)
    if nm:
        index_bits = 8 * math.ceil(w.numel() // nm[1] * nm_code_bits(*nm) / 8)
    else:
        index_bits = 8 * math.ceil(w.numel() / 8)
    assert p.nbits() == index_bits + p.nnz * vbits


@pytest.mark.parametrize("n,m", [(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (7, 8)])
def test_nm_codes_round_trip(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    score = torch.rand(6, 8 * m, generator=g)
    mask = keep_mask(score, 1 - n / m, (n, m))
    idx = encode_nm(mask, n, m)
    assert idx.numel() == math.ceil(mask.numel() // m * nm_code_bits(n, m) / 8)
    assert torch.equal(decode_nm(idx, n, m, mask.shape), mask)
    bad = mask.clone()
    bad[0, :m] = True
    with pytest.raises(SlimlmError):
        encode_nm(bad, n, m)


@pytest.mark.parametrize("pattern", ["0.5", "2:4", "4:8"])
@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (3, 16, False), (4, 0, True), (8, 64, False)])
def test_absorb_quantized_keeps_mask_and_codes(pattern, bits, group, sym):
    w, _, stats = _data(seed=2)
    p = _prune("wanda", w, stats, sparsity=pattern)
    q = quantize_rtn(p.dequantize(), bits, group, sym)  # what a later quantize stage sees and returns
    a = p.absorb(q)
    mask = p.mask()
    assert isinstance(a, Sparse) and a.quantized and torch.equal(a.mask(), mask)
    dq = a.dequantize()
    assert torch.equal(dq[mask], q.dequantize()[mask])  # kept: exactly the quantized values
    assert (dq[~mask] == 0).all()  # pruned: exact zeros
    # bits: codes of kept weights only, plus the index, plus the quantizer's scales (and mins)
    param_bits = q.scales.numel() * 16 * (1 if sym else 2)
    assert a.nbits() == 8 * math.ceil(a.nnz * bits / 8) + a.index.numel() * 8 + param_bits
    assert a.nbits() < q.nbits()
    meta, tensors = a.to_state()
    assert torch.equal(Sparse.from_state(meta, tensors).dequantize(), dq)


def test_absorb_leaves_other_formats_alone():
    w, _, stats = _data()
    p = _prune("magnitude", w, stats)
    other = _prune("magnitude", w, stats, sparsity="0.25")
    assert p.absorb(other) is other


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_sparsegpt_beats_wanda_beats_magnitude(seed, pattern):
    w, x, stats = _data(out=32, inp=96, seed=seed)
    frac, nm = parse_sparsity(pattern)
    wp, mask = sparsegpt_prune(w, stats.hessian, frac, nm)
    err = lambda v: float(((v - w) @ x.T).pow(2).sum())  # the layer's output error on its inputs
    assert (wp[~mask] == 0).all()
    assert err(wp) < err(w * mask)  # the update compensates part of the pruned weights' output
    wanda = _prune("wanda", w, stats, sparsity=pattern, values="float32").dequantize()
    mag = _prune("magnitude", w, stats, sparsity=pattern, values="float32").dequantize()
    assert err(wp) < err(wanda) < err(mag)


def test_sparsegpt_update_is_the_optimal_compensation():
    # pruning only the first column, every later column free: one OBS step, which is the
    # exact least-squares optimum of the kept weights
    w, x, stats = _data(out=8, inp=32, seed=4)
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[:, 0] = False
    wp, _ = sparsegpt_prune(w, stats.hessian, 0.0, None, damp=0.0, mask=mask)
    h = stats.hessian
    opt = torch.linalg.solve(h[1:, 1:], h[1:] @ w.double().T).T  # (out, in-1)
    assert (wp[:, 0] == 0).all()
    assert torch.allclose(wp[:, 1:].double(), opt, rtol=1e-3, atol=1e-3)
    w0, mask0 = sparsegpt_prune(w, stats.hessian, 0.0, None)
    assert mask0.all() and torch.allclose(w0, w, atol=1e-5)  # nothing pruned: nothing changes


def test_config_errors():
    spec = get_method("wanda")
    for bad in ("1.5", "x", "4:2", "2:16"):
        with pytest.raises(SlimlmError):
            make_config(spec, {"sparsity": bad})
    with pytest.raises(SlimlmError):
        make_config(spec, {"values": "int8"})
    spec.check(make_config(spec, {"sparsity": "2:4"}), (8, 64))
    with pytest.raises(SlimlmError):
        spec.check(make_config(spec, {"sparsity": "4:8"}), (8, 100))


def test_engine_sparse_then_quantized_is_smaller_and_round_trips(tiny, tmp_path):
    import slimlm
    from slimlm.compress import CalibrationConfig, Recipe, compress_model
    from slimlm.eval.size import dir_bytes
    from slimlm.formats.store import save_compressed
    from slimlm.models.tiny import tiny_model

    calib = CalibrationConfig(n_windows=2, seq_len=64)
    recipe = Recipe.parse("wanda:sparsity=2:4+rtn:bits=4,group=32")
    assert Recipe.parse(recipe.to_string()) == recipe
    compress_model(tiny, recipe, calib, progress=False)
    q_only = compress_model(tiny_model("llama", seed=0), "rtn:bits=4,group=32", calib, progress=False)
    layer = tiny.model.model.layers[0].mlp.up_proj
    assert layer.packed.format_name == "sparse" and layer.packed.quantized
    save_compressed(tiny, tmp_path / "sq")
    save_compressed(q_only, tmp_path / "q")
    assert dir_bytes(tmp_path / "sq") < dir_bytes(tmp_path / "q")
    back = slimlm.load(tmp_path / "sq")
    ids = torch.arange(1, 40).unsqueeze(0)
    with torch.inference_mode():
        assert torch.equal(back.model(ids).logits, tiny.model(ids).logits)


def test_engine_sparsegpt_nm(tiny):
    from slimlm.compress import CalibrationConfig, compress_model

    compress_model(tiny, "sparsegpt:sparsity=4:8", CalibrationConfig(n_windows=2, seq_len=64), progress=False)
    for blk in tiny.model.model.layers:
        p = blk.self_attn.q_proj.packed
        assert (p.mask().reshape(-1, 8).sum(1) == 4).all()
        assert torch.isfinite(p.dequantize()).all()


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (3, 16, False), (4, 0, True)])
def test_sparsegpt_joint_quantization(pattern, bits, group, sym):
    w, x, stats = _data(out=32, inp=96, seed=6)
    joint = _prune("sparsegpt", w, stats, sparsity=pattern, bits=bits, group=group, sym=sym)
    assert joint.quantized and joint.bits == bits
    mask = joint.mask()
    _, nm = parse_sparsity(pattern)
    if nm:
        assert (mask.reshape(-1, nm[1]).sum(1) == nm[0]).all()
    dq = joint.dequantize()
    assert (dq[~mask] == 0).all()
    g = group or w.shape[1]
    levels = dq.new_tensor(range(1 << bits))
    s = joint.scales.float().repeat_interleave(g, 1)[:, : w.shape[1]]
    base = (levels - (1 << (bits - 1))) if sym else levels
    offs = 0 if sym else joint.mins.float().repeat_interleave(g, 1)[:, : w.shape[1]]
    on_grid = ((dq - offs).unsqueeze(-1) - base * s.unsqueeze(-1)).abs().amin(-1) <= 1e-5 * s
    assert on_grid[mask].all()  # every kept weight is one of its group's levels
    param_bits = joint.scales.numel() * 16 * (1 if sym else 2)
    assert joint.nbits() == 8 * math.ceil(joint.nnz * bits / 8) + joint.index.numel() * 8 + param_bits
    # joint rounding with feedback beats pruning first and rounding the result afterwards
    pruned = _prune("sparsegpt", w, stats, sparsity=pattern, values="float32")
    after = pruned.absorb(quantize_rtn(pruned.dequantize(), bits, group, sym)).dequantize()
    err = lambda v: float(((v - w) @ x.T).pow(2).sum())
    assert err(dq) < err(after)
