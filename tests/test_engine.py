from dataclasses import dataclass

import pytest
import torch

import slimlm
from slimlm.compress import CalibrationConfig, compress_model
from slimlm.compress.calibration import BlockInputs
from slimlm.errors import SlimlmError
from slimlm.formats import CompressedLinear
from slimlm.formats.store import load_compressed, save_compressed
from slimlm.methods import METHODS, register
from slimlm.methods.affine import quantize_rtn

SEEN = {}


@dataclass(frozen=True)
class ProbeConfig:
    bits: int = 8


if "_test_probe" not in METHODS:
    @register("_test_probe", ProbeConfig, needs=("hessian", "act_norm", "inputs"))
    def _probe(weight, stats, config):
        SEEN[stats.name] = stats
        return quantize_rtn(weight, config.bits, 16)


CAL = CalibrationConfig(n_windows=3, seq_len=32)


def test_rtn_replaces_every_block_linear(tiny):
    x = torch.randint(0, 384, (1, 24))
    ref = tiny.model(x).logits
    compress_model(tiny, "rtn:bits=8,group=16", progress=False)
    names = tiny.adapter.linear_names(tiny.model)
    assert all(isinstance(tiny.model.get_submodule(n), CompressedLinear) for n in names)
    assert (tiny.model(x).logits - ref).abs().max() < 0.05
    assert tiny.manifest["recipe"] == "rtn:bits=8,group=16" and tiny.manifest["calibration"] is None


def test_statistics_are_exact_and_only_gathered_when_needed(tiny):
    SEEN.clear()
    compress_model(tiny, "rtn:bits=4,group=16+_test_probe@*.mlp.down_proj", CAL, progress=False)
    assert set(SEEN) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    s = SEEN["model.layers.0.mlp.down_proj"]
    assert s.n_tokens == 3 * 32 and s.inputs.shape == (96, 160)
    x = s.inputs.double()  # fewer rows than the cap: every input row is kept
    assert torch.allclose(s.hessian, x.T @ x / 96, rtol=1e-5, atol=1e-7)  # fp32 products, fp64 sums
    assert torch.allclose(s.act_norm, (x ** 2).mean(0), rtol=1e-5, atol=1e-7)
    # the down_proj stage replaced the rtn stage (same kind, last match wins)
    assert tiny.model.get_submodule("model.layers.0.mlp.down_proj").method == "_test_probe"
    assert tiny.model.get_submodule("model.layers.0.mlp.up_proj").method == "rtn"


def test_calibration_flows_through_compressed_blocks(tiny):
    """Block 1's statistics come from block 0's *compressed* output."""
    SEEN.clear()
    compress_model(tiny, "rtn:bits=2,group=16@model.layers.0.*+_test_probe@model.layers.1.self_attn.q_proj",
                   CAL, progress=False)
    seen = SEEN["model.layers.1.self_attn.q_proj"].inputs
    # recompute block 1's q_proj input by running the (now compressed) model
    from slimlm.data import Split, calibration_windows, resolve_text

    text, _ = resolve_text(None, Split.CALIBRATION)
    windows = calibration_windows(tiny.tokenizer, text, CAL.n_windows, CAL.seq_len, CAL.seed)
    got = []
    block = tiny.model.model.layers[1]
    h = block.input_layernorm.register_forward_hook(lambda m, a, out: got.append(out.reshape(-1, out.shape[-1])))
    with torch.no_grad():
        for w in windows:
            tiny.model(w.unsqueeze(0), use_cache=False)
    h.remove()
    assert torch.allclose(torch.cat(got), seen, atol=1e-5)


def test_windows_are_independent(tiny):
    """A block's output for a window must not change when another window ran before it."""
    windows = torch.randint(0, 384, (3, 16))
    block = tiny.model.model.layers[0]
    both = BlockInputs(tiny.model, block, windows).run(block)
    alone = BlockInputs(tiny.model, block, windows[2:]).run(block)
    assert torch.equal(both[2], alone[0])
    full = tiny.model(windows[2:], use_cache=False, output_hidden_states=True).hidden_states[1]
    assert torch.allclose(alone[0], full[0], atol=1e-5)


def test_checks_run_before_any_work(tiny):
    with pytest.raises(SlimlmError, match="larger than the row length"):
        compress_model(tiny, "rtn:bits=4,group=128", progress=False)  # rows of the tiny model are 64 wide
    assert not any(isinstance(m, CompressedLinear) for m in tiny.model.modules())
    with torch.no_grad():
        tiny.model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("inf")
    with pytest.raises(SlimlmError, match="model.layers.1.self_attn.o_proj"):
        compress_model(tiny, "rtn:bits=4,group=16", progress=False)


def test_save_load_gives_bit_identical_logits(tiny, tmp_path):
    compress_model(tiny, "rtn:bits=3,group=48+rtn:bits=5,group=0,sym=true@*.v_proj", progress=False)
    x = torch.randint(0, 384, (2, 30))
    before = tiny.model(x).logits
    save_compressed(tiny, tmp_path / "m")
    back = load_compressed(tmp_path / "m")
    assert torch.equal(back.model(x).logits, before)
    assert back.manifest["recipe"] == tiny.manifest["recipe"]
    assert back.model.lm_head.weight.data_ptr() == back.model.model.embed_tokens.weight.data_ptr()
    assert back.model.get_submodule("model.layers.0.self_attn.v_proj").packed.symmetric
    again = slimlm.load(tmp_path / "m")  # the generic entry point too
    assert torch.equal(again.model(x).logits, before)


def test_save_is_atomic_and_never_clobbers(tiny, tmp_path, monkeypatch):
    compress_model(tiny, "rtn:bits=4,group=16", progress=False)
    dest = tmp_path / "out"
    save_compressed(tiny, dest)
    first = (dest / "slimlm.json").read_text()
    with pytest.raises(SlimlmError, match="already exists"):
        save_compressed(tiny, dest)
    import slimlm.formats.store as store

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(store, "layer_table", boom)
    with pytest.raises(RuntimeError):
        save_compressed(tiny, dest, overwrite=True)
    assert (dest / "slimlm.json").read_text() == first  # the old model is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind
    with pytest.raises(RuntimeError):
        save_compressed(tiny, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_corrupt_compressed_directory(tiny, tmp_path):
    compress_model(tiny, "rtn:bits=4,group=16", progress=False)
    save_compressed(tiny, tmp_path / "m")
    p = tmp_path / "m" / "packed.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(SlimlmError, match="truncated"):
        slimlm.load(tmp_path / "m")
    (tmp_path / "m" / "slimlm.json").write_text("{oops")
    with pytest.raises(SlimlmError, match="corrupt"):
        slimlm.load(tmp_path / "m")


def test_bf16_model_round_trips_bit_exactly(tiny, tmp_path):
    tiny.cast("bfloat16")
    assert tiny.model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers are not cast
    compress_model(tiny, "rtn:bits=8,group=16@*.mlp.*", progress=False)
    x = torch.randint(0, 384, (1, 20))
    before = tiny.model(x).logits
    save_compressed(tiny, tmp_path / "bf16")
    back = load_compressed(tmp_path / "bf16")
    assert back.dtype == torch.bfloat16 and torch.equal(back.model(x).logits, before)


def test_calibrated_model_runs_with_autograd_on(tiny):
    """Weights dequantized during calibration are cached; they must serve a later plain forward."""
    compress_model(tiny, "rtn:bits=4,group=16+_test_probe@*.mlp.*", CAL, progress=False)
    assert torch.isfinite(tiny.model(torch.randint(0, 384, (1, 8))).logits).all()
