"""Run-time memory = the compressed size: a loaded compressed model is views of its memory-mapped
files (no float32 weight of a compressed layer is made), the lean runtime runs every batch
size through the kernels (no dequantized weight is cached, even after a long prefill), and
the packed pages the kernels repacked go back to the file while staying readable."""

import pytest
import torch

from slimlm.compress import compress_model
from slimlm.errors import SlimlmError
from slimlm.formats.intq import IntQuant
from slimlm.formats.linear import CompressedEmbedding, CompressedLinear
from slimlm.formats.mapped import _MAPS, map_safetensors, release
from slimlm.formats.store import load_compressed, save_compressed
from slimlm.kernels import extension
from slimlm.models.tiny import tiny_model
from slimlm.runtime.lean import LeanModel, RuntimeConfig

needs_kernels = pytest.mark.skipif(extension() is None, reason="C kernels not built")
RECIPE = "rtn:bits=4,group=16,sym=true+rtn:bits=8,group=16@lm_head"  # the reported w4s recipe's shape


def _mapped(t: torch.Tensor) -> bool:
    return any(start <= t.data_ptr() < end for start, (end, _) in _MAPS.items())


@pytest.fixture
def saved(tmp_path):
    lm = tiny_model("llama", seed=0)
    compress_model(lm, RECIPE, progress=False)
    save_compressed(lm, tmp_path / "m")
    return lm, tmp_path / "m"


def test_loading_maps_the_files_and_makes_no_float32_weight(saved):
    _, path = saved
    lm = load_compressed(path)
    layers = {n: m for n, m in lm.model.named_modules() if isinstance(m, CompressedLinear)}
    assert len(layers) == 2 * 7 + 1 and isinstance(lm.model.get_input_embeddings(), CompressedEmbedding)
    for m in layers.values():
        _, tensors = m.packed.to_state()
        assert all(_mapped(t) for t in tensors.values())  # views of packed.safetensors, not copies
        assert m._weight is None
    # every parameter is a view of dense.safetensors (norms): none has a compressed layer's place
    for name, p in lm.model.named_parameters():
        assert _mapped(p), name
        assert not any(name.startswith(n + ".") and not name.endswith(".bias") for n in layers)


@needs_kernels
def test_long_prefill_caches_no_dequantized_weight(saved, monkeypatch):
    """A 40-token prefill (past the 16 rows where the runtime used to take the reference path,
    and past the fused step's length), then single steps: the logits stay within the int8 path's
    error of the reference, and no layer holds a float32 copy of its weight afterwards."""
    monkeypatch.setenv("SLIMLM_INTQ_PATH", "int8")
    ref_lm, path = saved
    lm = load_compressed(path)
    ids = torch.randint(0, 384, (48,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        ref = ref_lm.model(torch.tensor([ids])).logits[0]
    lean = LeanModel(lm.model, RuntimeConfig())
    got = torch.cat([lean.extend(ids[:40], all_logits=True), torch.stack([lean.step(t) for t in ids[40:]])])
    assert (got - ref).abs().max() < 0.03 * ref.abs().max()
    assert all(m._weight is None for m in lm.model.modules() if isinstance(m, CompressedLinear))
    ops = [op for b in lean.blocks for op in (b.qkv, b.o, b.gate_up, b.down)] + [lean.head]
    assert all(op.kernel is not None for op in ops)


@needs_kernels
def test_kernels_leave_the_model_bit_for_bit_as_loaded(saved):
    """Building the runtime hands the packed pages back to the file: the model's reference
    forward (evaluation) reads them again and gives the same logits."""
    _, path = saved
    lm = load_compressed(path)
    x = torch.randint(0, 384, (1, 24))
    with torch.no_grad():
        before = lm.model(x).logits
        for m in lm.model.modules():
            if isinstance(m, CompressedLinear):
                m.drop_cache()
        LeanModel(lm.model, RuntimeConfig())
        assert torch.equal(lm.model(x).logits, before)


def test_mapped_tensors_survive_release(tmp_path):
    from safetensors.torch import save_file

    d = {"a": torch.randn(3000, 700), "b": torch.arange(10, dtype=torch.int16), "c": torch.zeros(0, 4),
         "h": torch.randn(5, 3).half()}
    save_file(d, str(tmp_path / "t.safetensors"))
    m = map_safetensors(tmp_path / "t.safetensors")
    assert all(m[k].dtype == d[k].dtype and torch.equal(m[k], d[k]) for k in d)
    assert release([m["a"]]) > 0 and torch.equal(m["a"], d["a"])  # pages dropped, read back from the file
    assert release([torch.randn(3000, 700)]) == 0  # not a mapped tensor: left alone


def test_truncated_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.randn(100, 100)}, str(tmp_path / "t.safetensors"))
    raw = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[:-100])
    with pytest.raises(SlimlmError, match="truncated"):
        map_safetensors(tmp_path / "t.safetensors")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(40, 48), (37, 50)])
def test_row_chunks_stack_to_the_matrix(bits, shape):
    out, inp = shape
    q = torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(bits))
    p = IntQuant.from_codes(q, torch.rand(out, -(-inp // 16)) + 0.1, torch.randn(out, -(-inp // 16)), bits, 16)
    chunks = p.row_chunks(12)  # 8 rows each
    assert [c.out_features for c in chunks][:-1] == [8] * (len(chunks) - 1) and sum(c.out_features for c in chunks) == out
    assert torch.equal(torch.cat([c.dequantize() for c in chunks]), p.dequantize())
    lo, hi = p.codes.data_ptr(), p.codes.data_ptr() + p.codes.numel()
    assert all(lo <= c.codes.data_ptr() < hi for c in chunks)  # views, nothing copied
    if extension() is not None:
        from slimlm.kernels.intq import IntQKernel

        a, b = IntQKernel(chunks, extension()), IntQKernel(p, extension())
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


@needs_kernels
def test_mixed_layouts_run_one_kernel_each(monkeypatch):
    """q/k/v at different bits cannot share one kernel call: each gets its own kernel (not the
    reference path, which would cache a float32 weight on a long prefill)."""
    monkeypatch.setenv("SLIMLM_INTQ_PATH", "int8")
    lm = tiny_model("llama", seed=0)
    compress_model(lm, "rtn:bits=4,group=16+rtn:bits=8,group=16@*.v_proj", progress=False)
    ids = torch.randint(0, 384, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        ref = lm.model(torch.tensor([ids])).logits[0]
    for m in lm.model.modules():
        if isinstance(m, CompressedLinear):
            m.drop_cache()
    lean = LeanModel(lm.model, RuntimeConfig())
    assert lean.blocks[0].qkv.kernel is None and len(lean.blocks[0].qkv.parts) == 3
    got = lean.extend(ids, all_logits=True)
    assert (got - ref).abs().max() < 0.03 * ref.abs().max()
    assert all(m._weight is None for m in lm.model.modules() if isinstance(m, CompressedLinear))


@needs_kernels
def test_runtime_head_is_quantized_in_row_chunks_as_a_whole(monkeypatch):
    """`head_bits` quantizes the head a chunk of rows at a time (RTN is row by row): the stacked
    kernel holds exactly the codes of the whole-matrix RTN, for a dense and a compressed head."""
    from slimlm.kernels.intq import IntQKernel
    from slimlm.methods.affine import quantize_rtn
    from slimlm.runtime import lean as lean_mod

    monkeypatch.setattr(lean_mod._LinearOp, "REPACK_ROWS", 64)  # 384 rows: 6 chunks
    for recipe in (None, "rtn:bits=4,group=16+rtn:bits=8,group=16@lm_head"):
        lm = tiny_model("llama", seed=0)
        if recipe:
            compress_model(lm, recipe, progress=False)
        head = lm.model.get_output_embeddings()
        w = head.packed.dequantize() if isinstance(head, CompressedLinear) else head.weight
        whole = IntQKernel(quantize_rtn(w.detach().float(), 4, 16), extension())
        got = LeanModel(lm.model, RuntimeConfig(head_bits=4, head_group=16)).head
        assert len(got.mods) == 6 and torch.equal(got.kernel.codes, whole.codes)
        assert torch.equal(got.kernel.scales, whole.scales) and torch.equal(got.kernel.mins, whole.mins)
