"""fit and the output head: its sensitivity measured like a block linear's, its gain from
the whole model (the tied embedding reads the same table)."""

import pytest
import torch

from slimlm.fit import sensitivity as sens_mod
from slimlm.fit.presets import HEAD_PROBE, fit_head_candidates
from slimlm.fit.sensitivity import SensitivityConfig, measure

CANDS = ("rtn:bits=2,group=32", "rtn:bits=3,group=32", "rtn:bits=4,group=32", "rtn:bits=8,group=64")
SENS = SensitivityConfig(n_windows=2, seq_len=64, kl_windows=1)


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
