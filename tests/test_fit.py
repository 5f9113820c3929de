"""fit: budgets parsed, the knapsack exact against brute force, recipes that say exactly
what was chosen, sensitivity measured and cached, and every budget met or refused."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from slimlm.compress import Recipe
from slimlm.errors import SlimlmError
from slimlm.eval.run import EvalConfig
from slimlm.fit import sensitivity as sens_mod
from slimlm.fit.budget import Budget, parse_fraction, parse_size
from slimlm.fit.run import FitConfig, run_fit
from slimlm.fit.sensitivity import SensitivityConfig, measure, tail_logprobs
from slimlm.fit.solve import build_plan, recipe_from_choice

CANDS = ("rtn:bits=2,group=32", "rtn:bits=3,group=32", "rtn:bits=4,group=32", "rtn:bits=8,group=64")
SENS = SensitivityConfig(n_windows=2, seq_len=64, kl_windows=1)
FAST_EVAL = EvalConfig(seq_len=64, max_tokens=256)


@pytest.mark.parametrize("text,expected", [("60MB", 60 * 10**6), ("1.5GiB", int(1.5 * 2**30)), ("512 kib", 512 * 1024),
                                           ("123456", 123456)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_budget_errors():
    assert parse_fraction("2%") == pytest.approx(0.02) and parse_fraction("0.05") == 0.05
    for bad in ("60 parsecs", "MB", "-3MB"):
        with pytest.raises(SlimlmError, match="not a size"):
            parse_size(bad)
    with pytest.raises(SlimlmError, match="not a fraction"):
        parse_fraction("two percent")
    with pytest.raises(SlimlmError, match="give fit a budget"):
        Budget()
    with pytest.raises(SlimlmError, match="positive"):
        Budget(max_bpw=0)


def _brute(cost, bits, max_bits=None, max_cost=None):
    best = None
    for pick in itertools.product(*[np.flatnonzero(np.isfinite(c)) for c in cost]):
        k = sum(cost[i, c] for i, c in enumerate(pick))
        b = sum(bits[i, c] for i, c in enumerate(pick))
        if max_bits is not None and b > max_bits:
            continue
        if max_cost is not None and k > max_cost:
            continue
        key = (b, k) if max_cost is not None else (k, b)
        if best is None or key < best[0]:
            best = (key, pick)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_matches_brute_force_and_respects_the_budget(seed):
    rng = np.random.default_rng(seed)
    L, C = 5, 3
    bits = rng.integers(100, 1000, size=(L, C))
    cost = rng.random((L, C))
    cost[rng.random((L, C)) < 0.15] = np.inf  # some candidates cannot store some layers
    cost[:, 0] = rng.random(L)  # every layer keeps one candidate
    layers, cands = [f"l{i}" for i in range(L)], [f"c{j}" for j in range(C)]
    plan = build_plan(layers, cands, cost, bits)
    assert plan.unit == 1  # small totals: no rounding, so the optimum is the true one
    for max_bits in (plan.min_bits() - 1, plan.min_bits(), int(bits.sum() / 2 / C * 2), int(bits.max(1).sum())):
        choice = plan.choose(max_bits=max_bits)
        ref = _brute(cost, bits, max_bits=max_bits)
        if ref is None:
            assert choice is None
            continue
        pick = [cands.index(choice[n]) for n in layers]
        assert sum(bits[i, c] for i, c in enumerate(pick)) <= max_bits
        assert sum(cost[i, c] for i, c in enumerate(pick)) == pytest.approx(ref[0][0])
    max_cost = float(np.nanmin(np.where(np.isfinite(cost), cost, np.nan), 1).sum() * 1.5)
    choice = plan.choose(max_cost=max_cost)
    pick = [cands.index(choice[n]) for n in layers]
    assert sum(bits[i, c] for i, c in enumerate(pick)) == _brute(cost, bits, max_cost=max_cost)[0][0]


def test_knapsack_rounds_sizes_up_so_budgets_hold():
    rng = np.random.default_rng(0)
    bits = rng.integers(10**6, 10**7, size=(40, 4))  # totals far above RESOLUTION cells
    cost = rng.random((40, 4))
    plan = build_plan([f"l{i}" for i in range(40)], list("abcd"), cost, bits)
    assert plan.unit > 1
    for frac in np.linspace(0.3, 1.0, 8):
        max_bits = int(bits.max(1).sum() * frac)
        choice = plan.choose(max_bits=max_bits)
        if choice is not None:
            assert sum(bits[i, "abcd".index(choice[f"l{i}"])] for i in range(40)) <= max_bits


def test_knapsack_meets_a_budget_of_exactly_the_smallest_candidates():
    """Rounding sizes up to cells must not refuse what every layer's smallest candidate meets."""
    rng = np.random.default_rng(1)
    bits = rng.integers(10**6, 10**7, size=(40, 4))
    plan = build_plan([f"l{i}" for i in range(40)], list("abcd"), rng.random((40, 4)), bits)
    assert plan.unit > 1
    choice = plan.choose(max_bits=plan.min_bits())
    assert choice is not None and sum(bits[i, "abcd".index(choice[f"l{i}"])] for i in range(40)) == plan.min_bits()
    assert plan.choose(max_bits=plan.min_bits() - 1) is None


@pytest.mark.parametrize("seed", range(4))
def test_recipe_says_exactly_what_was_chosen(seed, tiny):
    rng = np.random.default_rng(seed)
    layers = tiny.adapter.linear_names(tiny.model)
    choice = {n: CANDS[int(rng.integers(0, len(CANDS)))] for n in layers}
    if seed == 0:
        choice = {n: CANDS[1] if n.endswith("down_proj") else CANDS[2] for n in layers}
    recipe = recipe_from_choice(choice, layers, tiny.adapter.blocks_path)
    again = Recipe.parse(recipe.to_string())
    for n in layers:
        assert [s.to_string().split("@")[0] for s in again.stages_for(n)] == [choice[n]]
    if seed == 0:
        assert recipe.to_string() == "rtn:bits=4,group=32+rtn:bits=3,group=32@*.mlp.down_proj"


def test_tail_from_block_zero_is_the_model(tiny):
    from slimlm.compress.calibration import BlockInputs

    ids = torch.randint(0, 384, (2, 32))
    blocks = tiny.adapter.blocks(tiny.model)
    inputs = BlockInputs(tiny.model, blocks[0], ids)
    got = tail_logprobs(tiny, 0, inputs.hidden, inputs.kwargs)
    with torch.inference_mode():
        want = torch.cat([F.log_softmax(tiny.model(w.unsqueeze(0), use_cache=False).logits[0], -1) for w in ids])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    inputs.advance(blocks[0])
    with torch.inference_mode():
        torch.testing.assert_close(tail_logprobs(tiny, 1, inputs.hidden, inputs.kwargs), want, atol=1e-5, rtol=1e-5)


def test_sensitivity_orders_bits_and_is_cached(tiny, tmp_path, monkeypatch):
    before = {n: p.clone() for n, p in tiny.model.state_dict().items()}
    t = measure(tiny, list(CANDS), SENS, cache_dir=tmp_path, progress=False)
    for n, p in tiny.model.state_dict().items():  # the model is left as it was
        assert torch.equal(p, before[n]), n
    for layer in t.layers:
        errs = [t.err[layer][c] for c in CANDS]
        assert errs[0] > errs[1] > errs[2] > errs[3] >= 0
        assert t.bits[layer][CANDS[0]] < t.bits[layer][CANDS[1]] < t.bits[layer][CANDS[2]]
        assert t.gain[layer] >= 0 and t.probe_kl[layer] >= 0
    assert sum(t.probe_kl.values()) > 0
    monkeypatch.setattr(sens_mod, "_measure", lambda *a, **k: pytest.fail("measured again despite the cache"))
    cached = measure(tiny, list(CANDS), SENS, cache_dir=tmp_path, progress=False)
    assert cached.err == t.err and cached.bits == t.bits and cached.gain == pytest.approx(t.gain)


@pytest.fixture(scope="module")
def fit_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fit")  # shared: the sensitivity cache is measured once


@pytest.mark.parametrize("budget", [Budget(max_bpw=3.6), Budget(max_bpw=5.2), Budget(max_ppl_increase=0.002)])
def test_fit_meets_its_budget(tiny_dir, fit_dir, budget):
    cfg = FitConfig(budget=budget, candidates=CANDS, sensitivity=SENS, eval=FAST_EVAL, out_dir=str(fit_dir))
    res = run_fit(str(tiny_dir), cfg, progress=False)
    row = res.row
    if budget.max_bpw is not None:
        assert res.met and row["bpw"] <= budget.max_bpw
    if budget.max_ppl_increase is not None:  # met, or a sentence saying by how much it was missed
        assert (res.met and row["ratio"] <= 1 + budget.max_ppl_increase) or "perplexity" in res.verdict
    saved = Recipe.load(str(fit_dir / "recipe.yaml"))
    assert saved.to_string() == res.recipe == (fit_dir / "recipe.txt").read_text().strip()


def test_fit_size_budget_and_a_refusal(tiny_dir, fit_dir):
    from slimlm.loading import load

    from slimlm.fit.size import SizeModel

    fixed = SizeModel.of(load(str(tiny_dir)), head=False).rest_bytes  # the dense head included
    size = fixed + 64 * 1024 // 8 * 3 * 21  # room for about 3 bits per weight in the block linears
    cfg = FitConfig(budget=Budget(max_size_bytes=size), candidates=CANDS, sensitivity=SENS, eval=FAST_EVAL,
                    out_dir=str(fit_dir), head=False)
    res = run_fit(str(tiny_dir), cfg, progress=False)
    assert res.met and res.row["size_bytes"] <= size and res.row["head_bpw"] is None
    code, out, err = run_cli("fit", tiny_dir, "--max-size", f"{fixed // 2}B", *sum([["--candidate", c] for c in CANDS], []),
                             "--sens-windows", 2, "--calib-seq-len", 64, "--seq-len", 64, "--max-tokens", 256,
                             "--out", fit_dir, "--quiet")
    assert code == 1 and "cannot be met" in err and "embeddings" in err


def test_fit_beats_uniform_at_the_same_bits(tiny_dir, fit_dir):
    """The point of fit: at the bits of uniform 3-bit RTN (groups of 32: 4.0 bpw), less KL."""
    from slimlm.sweep import SweepConfig, run_sweep

    res = run_fit(str(tiny_dir), FitConfig(budget=Budget(max_bpw=4.0), candidates=CANDS, sensitivity=SENS,
                                           eval=FAST_EVAL, out_dir=str(fit_dir)), progress=False)
    uni = run_sweep(str(tiny_dir), SweepConfig(recipes=("rtn:bits=3,group=32",), out_dir=str(fit_dir / "sweep"),
                                               eval=FAST_EVAL, bench=False), progress=False).rows[1]
    assert res.row["bpw"] <= uni["bpw"] + 1e-9
    assert res.row["kl"] < uni["kl"]
    assert math.isfinite(res.row["predicted_kl"])
