"""Compressing the output head (and the tied input embedding) with a recipe.

The head is compressed only when a stage's patterns name it (`@lm_head`, `@*`); with
tied embeddings the input embedding then gathers rows of the compressed head
(`CompressedEmbedding`), stored once, packed.
"""

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open
from torch import nn

from conftest import run_cli
from slimlm.compress import CalibrationConfig, Recipe, compress_model, plan_layers
from slimlm.errors import SlimlmError
from slimlm.eval.size import size_report
from slimlm.formats import CompressedLinear
from slimlm.formats.linear import CompressedEmbedding, replace_linear
from slimlm.formats.store import load_compressed, save_compressed
from slimlm.methods import METHODS, register
from slimlm.methods.affine import quantize_rtn
from slimlm.models.tiny import tiny_model
from slimlm.runtime import GenerationConfig, generate_ids
from slimlm.runtime.generate import _generate_ids_transformers
from slimlm.runtime.lean import LeanModel, RuntimeConfig

BLOCKS = "rtn:bits=4,group=16"
WITH_HEAD = "rtn:bits=4,group=16+rtn:bits=4,group=16@lm_head"
SEEN = {}


@dataclass(frozen=True)
class HeadProbeConfig:
    bits: int = 8


if "_test_head_probe" not in METHODS:
    @register("_test_head_probe", HeadProbeConfig, needs=("hessian", "act_norm", "inputs"))
    def _head_probe(weight, stats, config):
        SEEN[stats.name] = stats
        return quantize_rtn(weight, config.bits, 16)


def _keys(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def _x():
    return torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(5))


def test_default_recipe_leaves_the_head_untouched():
    lm, manual = tiny_model("llama"), tiny_model("llama")
    assert "lm_head" not in plan_layers(lm, Recipe.parse(BLOCKS))
    compress_model(lm, BLOCKS, progress=False)
    for name in manual.adapter.linear_names(manual.model):  # what the engine did before the head was an option
        lin = manual.model.get_submodule(name)
        replace_linear(manual.model, name, CompressedLinear(quantize_rtn(lin.weight.detach().float(), 4, 16),
                                                            method="rtn"))
    m = lm.model
    assert type(m.lm_head) is nn.Linear and type(m.model.embed_tokens) is nn.Embedding
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    x = _x()
    assert torch.equal(m(x).logits, manual.model(x).logits)
    assert size_report(lm)["head_bpw"] is None


def test_compressed_head_is_stored_once_and_reloads_bit_exactly(tmp_path):
    plain, lm = tiny_model("llama"), tiny_model("llama")
    compress_model(plain, BLOCKS, progress=False)
    compress_model(lm, WITH_HEAD, progress=False)
    m = lm.model
    assert isinstance(m.lm_head, CompressedLinear) and isinstance(m.model.embed_tokens, CompressedEmbedding)
    assert not [n for n, _ in m.named_parameters() if "embed" in n or "lm_head" in n]  # no fp32 copy left
    x = _x()
    before = m(x).logits
    save_compressed(plain, tmp_path / "plain")
    save_compressed(lm, tmp_path / "head")
    assert "model.embed_tokens.weight" in _keys(tmp_path / "plain" / "dense.safetensors")
    assert not any("embed" in k or "lm_head" in k for k in _keys(tmp_path / "head" / "dense.safetensors"))
    assert {"lm_head/codes", "lm_head/scales", "lm_head/mins"} <= _keys(tmp_path / "head" / "packed.safetensors")
    rep, rep_plain = size_report(lm, tmp_path / "head"), size_report(plain, tmp_path / "plain")
    assert rep["size_bytes"] < rep_plain["size_bytes"]
    assert rep["bpw"] == rep_plain["bpw"] == 6.0 and rep["head_bpw"] == 4 + 32 / 16  # bpw: block linears only
    assert size_report(lm)["size_bytes"] < size_report(plain)["size_bytes"]  # the in-memory estimate too

    back = load_compressed(tmp_path / "head")
    assert isinstance(back.model.model.embed_tokens, CompressedEmbedding)
    assert back.model.model.embed_tokens.head is back.model.lm_head
    assert torch.equal(back.model(x).logits, before)
    back.model.tie_weights()  # transformers' re-tying finds nothing to tie: no crash, no fp32 copy
    assert isinstance(back.model.lm_head, CompressedLinear)
    assert not [n for n, _ in back.model.named_parameters() if "embed" in n or "lm_head" in n]
    assert torch.equal(back.model(x).logits, before)
    man = json.loads((tmp_path / "head" / "slimlm.json").read_text())
    assert man["layers"]["lm_head"]["embedding"] == "model.embed_tokens"


def test_embedding_gathers_the_dequantized_rows():
    lm = tiny_model("llama")
    compress_model(lm, "rtn:bits=3,group=16@lm_head", progress=False)
    emb, head = lm.model.model.embed_tokens, lm.model.lm_head
    ids = torch.tensor([[5, 0, 383, 5], [7, 7, 1, 2]])
    want = head.packed.dequantize()[ids]
    head.drop_cache()
    assert torch.equal(emb(ids), want) and head._weight is None  # rows decoded alone (IntQuant.dequantize_rows)
    head.weight  # noqa: B018  (fills the cache the head's forward uses)
    assert torch.equal(emb(ids), want) and torch.equal(emb.weight, head.packed.dequantize())
    assert lm.model.get_input_embeddings() is emb and lm.dtype == torch.float32


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("in_features, group", [(64, 16), (50, 25), (33, 11)])  # 33·odd bits: rows not byte-aligned
@pytest.mark.parametrize("sym", [False, True])
def test_intquant_dequantize_rows_equals_dequantize(bits, in_features, group, sym):
    p = quantize_rtn(torch.randn(41, in_features, generator=torch.Generator().manual_seed(bits)), bits, group, sym)
    idx = torch.tensor([40, 0, 3, 3, 17])
    assert torch.equal(p.dequantize_rows(idx), p.dequantize()[idx])


def test_untied_model_compresses_the_head_alone(tmp_path):
    lm = tiny_model("llama", tie_word_embeddings=False)
    compress_model(lm, WITH_HEAD, progress=False)
    m = lm.model
    assert isinstance(m.lm_head, CompressedLinear) and type(m.model.embed_tokens) is nn.Embedding
    x = _x()
    before = m(x).logits
    save_compressed(lm, tmp_path / "m")
    assert "model.embed_tokens.weight" in _keys(tmp_path / "m" / "dense.safetensors")
    assert "embedding" not in json.loads((tmp_path / "m" / "slimlm.json").read_text())["layers"]["lm_head"]
    back = load_compressed(tmp_path / "m")
    assert type(back.model.model.embed_tokens) is nn.Embedding and torch.equal(back.model(x).logits, before)


def test_bf16_head_round_trips_bit_exactly(tmp_path):
    lm = tiny_model("llama")
    lm.cast("bfloat16")
    compress_model(lm, "rtn:bits=8,group=16@*.mlp.*|lm_head", progress=False)
    assert lm.dtype == torch.bfloat16 and lm.manifest["dtype"] == "bfloat16"
    x = _x()
    before = lm.model(x).logits
    save_compressed(lm, tmp_path / "m")
    back = load_compressed(tmp_path / "m")
    assert back.dtype == torch.bfloat16 and torch.equal(back.model(x).logits, before)


def test_checks_run_on_the_head():
    lm = tiny_model("llama")
    with pytest.raises(SlimlmError, match="cannot compress lm_head"):
        compress_model(lm, "rtn:bits=4,group=16+rtn:bits=4,group=128@lm_head", progress=False)  # rows are 64 wide
    assert not any(isinstance(mod, CompressedLinear) for mod in lm.model.modules())


def test_calibrated_head_sees_the_final_norm_output():
    """Untied, so the compressed model's head input is exactly what calibration saw."""
    lm = tiny_model("llama", tie_word_embeddings=False)
    cal = CalibrationConfig(n_windows=3, seq_len=32)
    SEEN.clear()
    compress_model(lm, "rtn:bits=4,group=16+_test_head_probe@lm_head", cal, progress=False)
    assert set(SEEN) == {"lm_head"} and lm.model.lm_head.method == "_test_head_probe"
    s = SEEN["lm_head"]
    from slimlm.data import Split, calibration_windows, resolve_text

    text, _ = resolve_text(None, Split.CALIBRATION)
    windows = calibration_windows(lm.tokenizer, text, cal.n_windows, cal.seq_len, cal.seed)
    got = []
    h = lm.model.lm_head.register_forward_pre_hook(lambda mod, a: got.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for w in windows:
            lm.model(w.unsqueeze(0), use_cache=False)
    h.remove()
    x = torch.cat(got)
    assert s.n_tokens == 96 and torch.allclose(s.inputs, x, atol=1e-5)
    assert torch.allclose(s.hessian, x.double().T @ x.double() / 96, rtol=1e-5, atol=1e-7)
    assert torch.allclose(s.act_norm, (x.double() ** 2).mean(0), rtol=1e-5, atol=1e-7)


def test_gptq_on_a_tied_head():
    lm = tiny_model("llama")
    compress_model(lm, "rtn:bits=4,group=16+gptq:bits=4,group=16@lm_head", CalibrationConfig(n_windows=2, seq_len=32),
                   progress=False)
    assert lm.model.lm_head.method == "gptq" and isinstance(lm.model.model.embed_tokens, CompressedEmbedding)
    assert torch.isfinite(lm.model(_x()).logits).all()


def test_lean_runtime_generates_what_the_reference_forward_does():
    lm = tiny_model("llama")
    compress_model(lm, WITH_HEAD, progress=False)
    prompt = torch.randint(0, 384, (6,), generator=torch.Generator().manual_seed(1)).tolist()
    cfg = GenerationConfig(max_new_tokens=10)
    lean = LeanModel(lm.model, RuntimeConfig(kernel="reference"))
    assert list(generate_ids(lean, prompt, cfg)) == list(_generate_ids_transformers(lm.model, prompt, cfg, (), None))
    assert lean.bytes_per_token() < LeanModel(tiny_model("llama").model, RuntimeConfig()).bytes_per_token()


@pytest.mark.parametrize("kernel", ["auto", "cpu"])
def test_lean_runtime_runs_the_compressed_head_on_the_kernels(kernel):
    from slimlm.kernels import extension

    lm = tiny_model("llama")
    compress_model(lm, WITH_HEAD, progress=False)
    ids = torch.randint(0, 384, (6,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = lm.model(torch.tensor([ids])).logits[0, -1]
    lean = LeanModel(lm.model, RuntimeConfig(kernel=kernel))
    assert (lean.extend(ids) - ref).abs().max() < 0.1  # kernels may round activations (see slimlm.kernels)
    assert (lean.head.kernel is not None) == (extension() is not None)


def test_cli_info_lists_the_head(tiny_dir, tmp_path):
    out = tmp_path / "h"
    code, stdout, err = run_cli("compress", tiny_dir, "--recipe", "rtn:bits=4,group=32+rtn:bits=6,group=32@lm_head",
                                "-o", out, "--json", "-q")
    assert code == 0, err
    assert json.loads(stdout)["head_bpw"] == 7.0
    code, stdout, err = run_cli("info", out, "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert len(res["layers"]) == 15 and res["layers"]["lm_head"]["bpw"] == 7.0 and res["bpw"] == 5.0
    code, _, err = run_cli("generate", out, "def f(x):", "--max-new-tokens", "4", "--no-chat")
    assert code == 0, err
    code, stdout, err = run_cli("info", out)
    assert code == 0 and "head 7.000" in stdout and "lm_head" in stdout, err
