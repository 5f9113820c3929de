"""The C kernels against each format's reference `dequantize()`, on both kernel paths.

Tolerances:
- float path: the same sums as `x @ dequantize().T` in another order (per 16-lane chunk,
  group by group), so equal to float32 rounding: within 2e-5 of the largest output.
- int8 path: it computes `quantize_activations(x) @ dequantize().T` (x rounded to int8 per
  block of 32 columns), so it equals that emulation to the same 2e-5; against the exact
  product its error is the activation rounding's: a rounding step of max|x| / 127 per
  block, uniform error of rms step / √12 ≈ 0.0057 σ for Gaussian x (max of 32 ≈ 2.5 σ),
  so the relative error of the output vector is ≈ 0.6 %: asserted < 1e-2 over ≥ 96 outputs.
Dequantization in C is bit-exact on both layouts.
"""

import os

import pytest
import torch

from slimlm.formats import FORMATS, CompressedLinear
from slimlm.formats.linear import Kernel
from slimlm.kernels import FAST, available, extension, isas, kernel_for, set_isa
from slimlm.kernels.intq import SMALL_BATCH, IntQKernel, Path, default_path, quantize_activations, repack, repack_i8
from slimlm.methods.affine import quantize_rtn

pytestmark = pytest.mark.skipif(not available(), reason="C kernels not built on this machine")

TOL = 2e-5
# (out, in, group): the embedded model's widths with groups 32/64/96/128/per-channel (0), rows not a
# multiple of any tile, odd and short last groups, groups that pad to 16 rather than 32
SHAPES = [(7, 576, 32), (5, 1536, 64), (3, 576, 96), (5, 576, 128), (6, 1536, 128), (3, 576, 0), (11, 1536, 0),
          (9, 100, 32), (4, 50, 7), (2, 64, 64), (5, 80, 64), (3, 96, 48), (6, 40, 0),
          (3, 320, 32), (2, 464, 16)]  # last tiles touching more than 8 groups (the wide scale lookups)
BATCHES = range(1, 17)  # matrix-vector and every small batch (tiled by 4); on the float path 17+ rows are prefill
ISAS = [*FAST, "scalar"]  # every int8-path kernel set; those this CPU cannot run are skipped, saying so


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test with the int8-path kernels of one ISA (csrc/cpu.c), then restores the best."""
    if request.param not in isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernels (it runs {', '.join(isas())})")
    set_isa(request.param)
    yield request.param
    set_isa(os.environ.get("SLIMLM_ISA"))  # back to the default (or to what the environment forced)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _packed(bits, sym, out, inp, group):
    g = torch.Generator().manual_seed(bits * 100 + out + inp + group)
    return quantize_rtn(torch.randn(out, inp, generator=g), bits, group, sym), g


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("out,inp,group", SHAPES)
def test_float_path_matches_reference(bits, sym, out, inp, group):
    p, g = _packed(bits, sym, out, inp, group)
    k = IntQKernel(p, extension(), Path.FLOAT)
    ref = p.dequantize()
    assert torch.equal(k.dequantize(), ref)  # C dequantization is exact
    for m in (1, 2, 3, 4, 5, 16, 17):
        x = torch.randn(m, inp, generator=g)
        assert _rel(k(x), x @ ref.T) < TOL, m


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("out,inp,group", SHAPES)
def test_int8_path_equals_its_emulation(isa, bits, sym, out, inp, group):
    p, g = _packed(bits, sym, out, inp, group)
    k = IntQKernel(p, extension(), Path.INT8)
    ref = p.dequantize()
    assert torch.equal(k.dequantize(), ref)
    for m in (*BATCHES, 70):  # 70: blocks of 64 activation rows
        x = torch.randn(m, inp, generator=g)
        assert _rel(k(x), quantize_activations(x, p.group) @ ref.T) < TOL, m


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("inp,group", [(576, 32), (576, 64), (1536, 128), (576, 0), (1536, 0)])
def test_int8_path_error_is_the_activation_rounding(isa, bits, sym, inp, group):
    p, g = _packed(bits, sym, 96, inp, group)
    k = IntQKernel(p, extension(), Path.INT8)
    for m in (1, 16):
        x = torch.randn(m, inp, generator=g)
        ref = x @ p.dequantize().T
        assert float((k(x) - ref).norm() / ref.norm()) < 1e-2, m


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_int8_rows_do_not_depend_on_the_batch(isa, bits):
    """Each activation row is quantized and summed alone: a batch gives each row's single-row result
    exactly (speculative verification relies on it)."""
    p, g = _packed(bits, False, 37, 576, 32)
    k = IntQKernel(p, extension(), Path.INT8)
    x = torch.randn(70, 576, generator=g)
    y = k(x)
    for i in range(70):
        assert torch.equal(y[i], k(x[i:i + 1])[0])
    assert torch.equal(y[3:9], k(x[3:9]))


@pytest.mark.parametrize("path", list(Path))
def test_portable_kernels_match(path):
    """The portable C loops (the scalar ISA: no vector kernel, no AVX-512 float loop)."""
    set_isa("scalar")
    assert extension().has_vnni() is False and extension().isa() == "scalar"
    try:
        _portable_cases(path)
    finally:
        set_isa(os.environ.get("SLIMLM_ISA"))


def _portable_cases(path):
    for bits, sym, out, inp, group in [(2, False, 5, 576, 32), (3, True, 6, 1536, 0), (4, False, 3, 50, 7),
                                       (8, True, 4, 96, 48), (5, False, 3, 576, 96)]:
        p, g = _packed(bits, sym, out, inp, group)
        k = IntQKernel(p, extension(), path)
        ref = p.dequantize()
        assert torch.equal(k.dequantize(), ref)
        for m in (1, 6):
            x = torch.randn(m, inp, generator=g)
            xr = quantize_activations(x, p.group) if path is Path.INT8 else x
            assert _rel(k(x), xr @ ref.T) < TOL


@pytest.mark.parametrize("path", list(Path))
def test_batched_inputs_and_empty_batches(path):
    p, g = _packed(4, False, 5, 96, 32)
    k = IntQKernel(p, extension(), path)
    x = torch.randn(2, 3, 96, generator=g)
    assert torch.equal(k(x), k(x.reshape(6, 96)).view(2, 3, 5))
    assert k(torch.randn(0, 96)).shape == (0, 5)


def test_default_path_and_its_override(monkeypatch):
    from slimlm.errors import SlimlmError
    from slimlm.kernels.intq import DEFAULT_PATH

    ext = extension()
    monkeypatch.delenv("SLIMLM_INTQ_PATH", raising=False)
    assert default_path(ext) is DEFAULT_PATH is Path.INT8  # on every CPU: each ISA has an int8 kernel
    monkeypatch.setenv("SLIMLM_INTQ_PATH", "int8")
    p, _ = _packed(4, False, 3, 64, 32)
    assert IntQKernel(p, ext).path is Path.INT8 and IntQKernel(p, ext, "float").path is Path.FLOAT
    monkeypatch.setenv("SLIMLM_INTQ_PATH", "int4")
    with pytest.raises(SlimlmError, match="SLIMLM_INTQ_PATH"):
        IntQKernel(p, ext)


def test_repacked_codes_take_the_stored_bytes_when_aligned():
    p = quantize_rtn(torch.randn(8, 576), 3, 32)
    assert repack(p).numel() == p.codes.numel()  # 576 = 9 superblocks of 64 codes, 24 bytes each
    assert repack_i8(p).numel() == p.codes.numel()  # 18 blocks of 32: one tile of 16, one of 2 × 8 lanes


@pytest.mark.parametrize("path", list(Path))
def test_stacked_kernel_is_the_concatenation(path):
    g = torch.Generator().manual_seed(0)
    ps = [quantize_rtn(torch.randn(o, 96, generator=g), 4, 32) for o in (9, 3, 3)]
    k = IntQKernel(ps, extension(), path)
    x = torch.randn(2, 96, generator=g)
    xr = quantize_activations(x, 32) if path is Path.INT8 else x
    ref = xr @ torch.cat([p.dequantize() for p in ps]).T
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
        y = lin(x)
        int8 = (kernel is Kernel.CPU or kernel is Kernel.AUTO and rows <= 16) and lin.kernel_op().path is Path.INT8
        ref = (quantize_activations(x, 16) if int8 else x) @ p.dequantize().T + b
        if kernel is Kernel.REFERENCE:
            assert torch.equal(y, torch.nn.functional.linear(x, p.dequantize(), b))
        assert _rel(y, ref) < TOL
    # the reference path caches the dequantized weight; the kernel path for small batches needs none
    assert (lin._weight is None) == (kernel is Kernel.CPU)


# one layer of each registered format, by method (tiny model: 2 blocks, width 64, FFN 160)
_L0, _L1 = "model.layers.0.", "model.layers.1."
EVERY_FORMAT = "+".join([
    f"rtn:bits=4,group=16@{_L0}self_attn.q_proj", f"awq:bits=4,group=16@{_L0}self_attn.k_proj",
    f"kmeans:bits=3@{_L0}self_attn.v_proj", f"vq:bits=2,dim=2,keep=0@{_L0}self_attn.o_proj",
    f"spqr:bits=3@{_L0}mlp.gate_proj", f"lossless@{_L0}mlp.up_proj",
    f"rtn:bits=4,group=16@{_L0}mlp.down_proj", f"lossless@{_L0}mlp.down_proj",
    f"welore:threshold=0.95@{_L1}self_attn.q_proj", f"magnitude:sparsity=0.5@{_L1}self_attn.k_proj",
    f"kmeans:bits=3,keep=2@{_L1}self_attn.v_proj", f"welore:threshold=0.0@{_L1}self_attn.o_proj",
])


@pytest.fixture(scope="module")
def every_format():
    from slimlm.compress import CalibrationConfig, compress_model
    from slimlm.models.tiny import tiny_model

    lm = tiny_model("llama")
    compress_model(lm, EVERY_FORMAT, CalibrationConfig(n_windows=3, seq_len=32), progress=False)
    layers = {m.packed.format_name: m for m in lm.model.modules() if isinstance(m, CompressedLinear)}
    return lm, layers


def test_every_registered_format_has_a_working_path(every_format, isa):
    """Every format in the registry, as its method makes it: a format a kernel serves runs the kernel
    (int8 path: equal to its activation-rounding emulation), the others run the reference path, equal
    to x @ dequantize().T exactly — on each ISA this CPU runs."""
    _, layers = every_format
    assert set(layers) == set(FORMATS)  # the recipe above must keep up with the registry
    g = torch.Generator().manual_seed(3)
    for name, lin in layers.items():
        p, served = lin.packed, kernel_for(lin.packed)
        assert (served is not None) == (name == "int"), name  # the formats with a kernel today
        w = p.dequantize()
        auto = CompressedLinear(p, bias=lin.bias, kernel=Kernel.AUTO)
        for rows in (1, 5, 40):  # `auto` runs a kernel for up to SMALL_BATCH rows, the reference above
            x = torch.randn(rows, lin.in_features, generator=g)
            if served is not None and rows <= SMALL_BATCH:
                ref = torch.nn.functional.linear(quantize_activations(x, p.group), w, lin.bias)
                assert _rel(auto(x), ref) < TOL, (name, rows)
            else:
                assert torch.equal(auto(x), torch.nn.functional.linear(x, w, lin.bias)), (name, rows)


def test_the_runtime_runs_a_model_mixing_every_format(every_format, isa):
    from slimlm.runtime.lean import LeanModel, RuntimeConfig

    lm, _ = every_format
    ids = list(range(3, 23))
    with torch.no_grad():
        ref = lm.model(torch.tensor([ids])).logits[0]
    lean = LeanModel(lm.model, RuntimeConfig())
    assert not lean.fused  # most formats have no fused form: the PyTorch blocks run
    got = torch.stack([lean.prefill(ids[:1]), *[lean.step(t) for t in ids[1:]]])
    assert float((got - ref).abs().max() / ref.abs().max()) < 2e-2  # int8 activations in the int layers


def test_isa_choice_is_visible_and_checked():
    from slimlm.errors import SlimlmError
    from slimlm.kernels import describe, isa

    names = isas()
    default = os.environ.get("SLIMLM_ISA") or names[0]
    assert names[-1] == "scalar" and isa() == default  # the best by default, the portable loop always there
    assert set(names) <= set(ISAS)
    d = describe()
    assert d["built"] and d["isa"] == default and d["isas"] == names
    with pytest.raises(SlimlmError, match="no kernels are called"):
        set_isa("sse9")
    missing = [n for n in ISAS if n not in names]
    for name in missing:  # e.g. neon_dotprod on x86, avx512_vnni on an AVX2-only CPU
        with pytest.raises(SlimlmError, match="cannot run"):
            set_isa(name)
    assert isa() == default


def test_a_bad_isa_in_the_environment_is_one_clear_error():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "from slimlm.kernels import extension; extension()"],
                       capture_output=True, text=True, env={**__import__("os").environ, "SLIMLM_ISA": "sse9"})
    assert r.returncode != 0 and "SLIMLM_ISA='sse9'" in r.stderr and "no kernels are called sse9" in r.stderr


def test_the_portable_loop_is_announced_once():
    import subprocess
    import sys

    code = ("import warnings; warnings.simplefilter('always')\n"
            "from slimlm.models.tiny import tiny_model\nfrom slimlm.compress import compress_model\n"
            "from slimlm.runtime.lean import LeanModel\nlm = tiny_model('llama')\n"
            "compress_model(lm, 'rtn:bits=4,group=32', progress=False)\nLeanModel(lm.model); LeanModel(lm.model)\n")
    for name, warned in (("scalar", True), (isas()[0], False)):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "SLIMLM_ISA": name})
        assert r.returncode == 0, r.stderr
        assert r.stderr.count("no vector int8 kernel") == (1 if warned else 0), (name, r.stderr)
