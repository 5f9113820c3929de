import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.formats import FORMATS, CompressedLinear, Dense, IntQuant, bitpack, format_class
from slimlm.methods.affine import quantize_rtn


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4097])
def test_pack_round_trip_and_size(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = bitpack.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
    assert torch.equal(bitpack.unpack(packed, bits, n), codes)


def test_pack_layout_is_little_endian_stream():
    # codes 1 (001) and 6 (110) in 3 bits: stream bits 1,0,0,0,1,1 -> byte 0b00110001
    assert bitpack.pack(torch.tensor([1, 6], dtype=torch.uint8), 3).tolist() == [0b110001]
    with pytest.raises(ValueError):
        bitpack.unpack(torch.zeros(3, dtype=torch.uint8), 3, 100)


SHAPES = [(16, 64), (12, 576), (8, 1536), (5, 100)]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group", [0, 16, 32, 64, 128])
@pytest.mark.parametrize("sym", [False, True])
def test_intquant_bits_exact_and_error_bounded(bits, group, sym):
    for out, inp in SHAPES:
        if group > inp:
            continue
        w = torch.randn(out, inp, generator=torch.Generator().manual_seed(out + inp))
        p = quantize_rtn(w, bits, group, sym)
        g = group or inp
        n_groups = -(-inp // g)
        expect = 8 * ((out * inp * bits + 7) // 8) + out * n_groups * 16 * (1 if sym else 2)
        assert p.nbits() == expect
        # nbits counts exactly what is stored
        _, tensors = p.to_state()
        assert p.nbits() == sum(t.numel() * t.element_size() * 8 for t in tensors.values())
        # round to nearest: error at most half a step (plus fp16 rounding of the parameters)
        err = (p.dequantize() - w).abs()
        step = p.scales.float().repeat_interleave(g, 1)[:, :inp]
        assert (err <= step * 0.5 + 1e-3 * w.abs().max()).all() or sym  # symmetric clamps the most negative level


def test_short_last_group_is_counted_and_used():
    w = torch.randn(4, 576)
    p = quantize_rtn(w, 4, 128)  # 576 = 4*128 + 64
    assert p.scales.shape == (4, 5)
    assert p.nbits() == 4 * 576 * 4 + 4 * 5 * 32
    # the last 64 columns get their own parameters: a huge value there changes only group 4
    w2 = w.clone()
    w2[:, -1] = 100
    p2 = quantize_rtn(w2, 4, 128)
    assert torch.equal(p2.scales[:, :4], p.scales[:, :4])
    assert (p2.scales[:, 4] > p.scales[:, 4]).all()


def test_affine_grid_is_reproduced_exactly():
    # weights that lie on a 4-bit grid per group of 32 (as the embedded model's Q4_1 blocks do)
    g = torch.Generator().manual_seed(0)
    d = (torch.rand(8, 576 // 32, generator=g) * 0.01 + 1e-3).half().float()  # fp16 scales, as in Q4_1
    m = (-torch.rand(8, 576 // 32, generator=g) * 0.1).half().float()
    q = torch.randint(0, 16, (8, 576), generator=g)
    q[:, ::32], q[:, 1::32] = 0, 15  # every block spans its full range
    w = q.float() * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1)
    assert torch.equal(quantize_rtn(w, 4, 32).dequantize(), w)
    assert not torch.equal(quantize_rtn(w, 4, 64).dequantize(), w)


def test_foundation_formats_round_trip_through_state():
    """The foundation's formats; each method's own test file round-trips the formats it adds."""
    w = torch.randn(6, 96)
    examples = {"int": quantize_rtn(w, 3, 32), "dense": Dense(w.half())}
    for name, p in examples.items():
        assert FORMATS[name] is type(p)
        meta, tensors = p.to_state()
        q = format_class(name).from_state(meta, tensors)
        assert torch.equal(q.dequantize(), p.dequantize()) and q.nbits() == p.nbits() and q.shape == p.shape


def test_corrupt_format_state_is_refused():
    p = quantize_rtn(torch.randn(4, 64), 4, 32)
    meta, tensors = p.to_state()
    with pytest.raises(SlimlmError, match="bytes"):
        IntQuant.from_state(meta, {**tensors, "codes": tensors["codes"][:-1]})
    with pytest.raises(SlimlmError, match="incomplete"):
        IntQuant.from_state(meta, {"codes": tensors["codes"]})
    with pytest.raises(SlimlmError, match="unknown packed format"):
        format_class("nope")


def test_compressed_linear_matches_dequantized_matmul():
    w, b = torch.randn(32, 64), torch.randn(32)
    p = quantize_rtn(w, 4, 16)
    lin = CompressedLinear(p, bias=b)
    x = torch.randn(3, 5, 64)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, p.dequantize(), b))
    assert "bpw=6.000" in repr(lin)  # 4 bits + 2 × 16 bits per 16 weights
