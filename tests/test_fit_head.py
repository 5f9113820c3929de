"""fit and the output head: its sensitivity measured, its bytes predicted (the tied table
counted once), a size budget met only by compressing it, --max-bpw leaving it dense by
default, and a size budget that cannot be met refused with the smallest reachable size."""

import re

import pytest
import torch

from conftest import run_cli
from slimlm.compress import Recipe, compress_model
from slimlm.errors import SlimlmError
from slimlm.eval.run import EvalConfig
from slimlm.eval.size import dir_bytes, linear_bits
from slimlm.fit import sensitivity as sens_mod
from slimlm.fit.budget import Budget
from slimlm.fit.presets import HEAD_PROBE, fit_head_candidates
from slimlm.fit.run import FitConfig, run_fit
from slimlm.fit.sensitivity import SensitivityConfig, measure
from slimlm.fit.size import SizeModel
from slimlm.formats.linear import CompressedEmbedding
from slimlm.formats.store import load_compressed, save_compressed
from slimlm.loading import load
from slimlm.models.tiny import tiny_model

CANDS = ("rtn:bits=2,group=32", "rtn:bits=3,group=32", "rtn:bits=4,group=32", "rtn:bits=8,group=64")
SENS = SensitivityConfig(n_windows=2, seq_len=64, kl_windows=1)
FAST_EVAL = EvalConfig(seq_len=64, max_tokens=256)
SIZE_TOLERANCE = 0.01  # the prediction is never below the saved size, and above it by at most 1 %


@pytest.fixture(scope="module")
def fit_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fit_head")  # shared: the sensitivity cache is measured once


def _fit(tiny_dir, fit_dir, budget, **kw):
    return run_fit(str(tiny_dir), FitConfig(budget=budget, candidates=CANDS, sensitivity=SENS, eval=FAST_EVAL,
                                            out_dir=str(fit_dir), **kw), progress=False)


def test_head_sensitivity_orders_bits_and_is_cached(tiny, tmp_path, monkeypatch):
    before = {n: p.clone() for n, p in tiny.model.state_dict().items()}
    heads = fit_head_candidates()
    t = measure(tiny, list(CANDS[:1]), SENS, cache_dir=tmp_path, progress=False, head_candidates=heads)
    for n, p in tiny.model.state_dict().items():  # the model is left as it was, still tied
        assert torch.equal(p, before[n]), n
    assert tiny.model.lm_head.weight.data_ptr() == tiny.model.model.embed_tokens.weight.data_ptr()
    assert t.head == "lm_head" and "lm_head" not in t.layers and t.numel["lm_head"] == 384 * 64
    for g in (32, 64):  # more bits: less error, more stored bits
        errs = [t.err["lm_head"][f"rtn:bits={b},group={g}"] for b in (4, 5, 6, 8)]
        bits = [t.bits["lm_head"][f"rtn:bits={b},group={g}"] for b in (4, 5, 6, 8)]
        assert errs == sorted(errs, reverse=True) and errs[-1] > 0 and bits == sorted(bits)
    assert t.probe_kl["lm_head"] > 0 and t.gain["lm_head"] > 0
    assert t.predicted_kl("lm_head", HEAD_PROBE) == pytest.approx(t.probe_kl["lm_head"])
    monkeypatch.setattr(sens_mod, "_measure_head", lambda *a, **k: pytest.fail("measured again despite the cache"))
    monkeypatch.setattr(sens_mod, "_measure", lambda *a, **k: pytest.fail("measured again despite the cache"))
    again = measure(tiny, list(CANDS[:1]), SENS, cache_dir=tmp_path, progress=False, head_candidates=heads)
    assert again.err == t.err and again.bits == t.bits and again.gain == pytest.approx(t.gain)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("recipe, head", [
    ("rtn:bits=3,group=32", False),
    ("rtn:bits=3,group=32", True),  # the head fit's to choose, left dense
    ("rtn:bits=3,group=32+rtn:bits=2,group=32@*.mlp.down_proj+rtn:bits=4,group=64@lm_head", True),
    ("rtn:bits=2,group=32+rtn:bits=8,group=32@model.layers.1.self_attn.q_proj|model.layers.0.mlp.up_proj"
     "+rtn:bits=6,group=32@lm_head", True),
])
def test_predicted_size_matches_the_saved_directory(tmp_path, tied, recipe, head):
    lm = tiny_model("llama", tie_word_embeddings=tied)
    sizes = SizeModel.of(lm, head)
    assert sizes.tied is tied
    recipe = Recipe.parse(recipe)
    compress_model(lm, recipe, progress=False)
    bits, _ = linear_bits(lm)
    if head:  # the head's packed bits, or its dense table
        bits += lm.model.lm_head.packed.nbits() if "@lm_head" in recipe.to_string() else sizes.head_dense_bits
    save_compressed(lm, tmp_path / "m")
    actual = dir_bytes(tmp_path / "m")
    predicted = sizes.predicted_bytes(bits, recipe)
    assert actual <= predicted <= actual * (1 + SIZE_TOLERANCE), (predicted, actual)
    assert actual <= sizes.predicted_bytes(bits)  # the allowance set aside for the recipe is enough


def test_size_budget_met_only_by_compressing_the_head(tiny_dir, fit_dir):
    reference = load(str(tiny_dir))
    dense_head = SizeModel.of(reference, head=False)
    numel = sum(reference.model.get_submodule(n).weight.numel()
                for n in reference.adapter.linear_names(reference.model))
    min_block_bits = 3 * numel  # rtn:bits=2,group=32: 2-bit codes, a 16-bit scale and min per 32 weights
    budget = dense_head.rest_bytes + dense_head.recipe_allowance + min_block_bits // 8 - 1000
    with pytest.raises(SlimlmError, match="head compression is off"):  # without the head: out of reach
        _fit(tiny_dir, fit_dir, Budget(max_size_bytes=budget), head=False)

    res = _fit(tiny_dir, fit_dir, Budget(max_size_bytes=budget))  # the head is fit's by default here
    row = res.row
    assert res.met and row["size_bytes"] <= budget and row["head_bpw"] is not None
    assert row["size_bytes"] <= row["predicted_size_bytes"] <= row["size_bytes"] * (1 + SIZE_TOLERANCE)
    assert row["bpw_with_head"] == pytest.approx((row["linear_bits"] + row["head_bits"]) / (numel + 384 * 64))
    assert re.search(r"\+rtn:bits=\d,group=\d+@lm_head$", res.recipe)
    saved = load_compressed(row["path"])
    assert isinstance(saved.model.model.embed_tokens, CompressedEmbedding)  # no fp32 table left
    # the written recipe reloads and reproduces the saved model
    again = load(str(tiny_dir))
    compress_model(again, Recipe.load(str(fit_dir / "recipe.yaml")), progress=False)
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.equal(again.model(ids).logits, saved.model(ids).logits)


def test_max_bpw_leaves_the_head_dense_unless_asked(tiny_dir, fit_dir):
    res = _fit(tiny_dir, fit_dir, Budget(max_bpw=3.6))
    assert res.met and res.row["bpw"] <= 3.6 and res.row["head_bpw"] is None
    assert "lm_head" not in res.recipe and "bpw_with_head" not in res.row
    res = _fit(tiny_dir, fit_dir, Budget(max_bpw=3.6), head=True)  # the head counts among the weights
    assert res.met and res.row["bpw_with_head"] <= 3.6 and res.recipe.endswith("@lm_head")
    assert res.row["head_bpw"] is not None


def test_unreachable_size_says_the_smallest_reachable(tiny_dir, fit_dir):
    with pytest.raises(SlimlmError) as e:
        _fit(tiny_dir, fit_dir, Budget(max_size_bytes=20_000))
    msg = str(e.value)
    least = re.search(r"the smallest model fit can make is ([0-9.]+) MB", msg)
    assert least and f"raise --max-size to at least {least.group(1)} MB" in msg
    for part in ("the block linears", "at their smallest candidates (mostly rtn:bits=2,group=32)",
                 "the output head", "as rtn:bits=4,group=64 (also the input embedding, tied)", "everything else"):
        assert part in msg
    res = _fit(tiny_dir, fit_dir, Budget(max_size_bytes=int(float(least.group(1)) * 1e6)))  # and it is reachable
    assert res.met and res.row["size_bytes"] <= float(least.group(1)) * 1e6
    code, _, err = run_cli("fit", tiny_dir, "--max-size", "20kB", *sum([["--candidate", c] for c in CANDS], []),
                           "--sens-windows", 2, "--calib-seq-len", 64, "--seq-len", 64, "--max-tokens", 256,
                           "--out", fit_dir, "--quiet")
    assert code == 1 and f"the smallest model fit can make is {least.group(1)} MB" in err
