import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.models.tiny import tiny_model
from slimlm.prune import Shape, StructuredConfig, apply_plan, make_plan, prune_structured, save_pruned
from slimlm.prune.importance import measure_importance

from conftest import run_cli

IDS = torch.arange(1, 48).unsqueeze(0)


def _windows(lm, n=2, t=32):
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, lm.config.vocab_size, (n, t), generator=g)


def _logits(model):
    with torch.inference_mode():
        return model(IDS, use_cache=False).logits


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_shapes_consistent_and_plain_transformers_loads(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = tiny_model(model_type, num_hidden_layers=3)  # 4 query / 2 KV heads, FFN 160
    cfg = StructuredConfig(ffn=0.25, heads=1, blocks=1, multiple=8)
    pruned, info = prune_structured(lm, cfg, _windows(lm))
    c = pruned.config
    assert (c.num_hidden_layers, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (2, 120, 2, 2)
    hd = Shape.of(lm.config).head_dim
    for blk in pruned.model.model.layers:
        a = blk.self_attn
        assert a.q_proj.weight.shape == (2 * hd, 64) and a.k_proj.weight.shape == (2 * hd, 64)
        assert a.o_proj.weight.shape == (64, 2 * hd) and blk.mlp.down_proj.weight.shape == (64, 120)
        assert a.num_key_value_groups == 1
    assert [b.self_attn.layer_idx for b in pruned.model.model.layers] == [0, 1]
    assert pruned.model.lm_head.weight is pruned.model.model.embed_tokens.weight  # still tied
    save_pruned(pruned, tmp_path / "p", info)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "p")  # plain transformers, no slimlm
    assert torch.equal(_logits(plain), _logits(pruned.model))
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    # and it generates with a KV cache
    from slimlm.runtime.generate import GenerationConfig, generate_ids

    assert len(list(generate_ids(plain, [1, 2, 3], GenerationConfig(max_new_tokens=5)))) == 5


@pytest.mark.parametrize("heads,kv_groups", [(0, 0), (1, 0), (0, 1)])
def test_pruned_model_equals_original_with_pruned_parts_zeroed(heads, kv_groups):
    # cutting a channel or a query head is exactly zeroing its column of down_proj / o_proj;
    # cutting a KV group is zeroing the o_proj columns of all its query heads
    lm = tiny_model("llama")
    s = Shape.of(lm.config)
    imp = measure_importance(lm, _windows(lm), s.head_dim)
    plan = make_plan(s, StructuredConfig(ffn=0.3, heads=heads, kv_groups=kv_groups, multiple=1), imp)
    pruned = apply_plan(lm, plan)
    ref = tiny_model("llama")
    with torch.no_grad():
        for k, blk in enumerate(ref.model.model.layers):
            drop_ch = torch.ones(s.inter, dtype=torch.bool)
            drop_ch[plan.channels[k]] = False
            blk.mlp.down_proj.weight[:, drop_ch] = 0
            drop_q = torch.ones(s.q_heads, dtype=torch.bool)
            drop_q[plan.q_heads[k]] = False
            blk.self_attn.o_proj.weight.view(s.hidden, s.q_heads, s.head_dim)[:, drop_q] = 0
    assert torch.allclose(_logits(pruned.model), _logits(ref.model), atol=1e-5)


def test_nothing_removed_is_identical():
    lm = tiny_model("llama")
    pruned, _ = prune_structured(lm, StructuredConfig(), _windows(lm))
    assert torch.equal(_logits(pruned.model), _logits(lm.model))


def test_importance_picks_dead_channels_heads_and_blocks():
    lm = tiny_model("llama", num_hidden_layers=3)
    s = Shape.of(lm.config)
    with torch.no_grad():
        b0 = lm.model.model.layers[0]
        b0.mlp.down_proj.weight[:, :40] = 0  # 40 channels that add nothing
        b0.self_attn.o_proj.weight[:, : s.head_dim] = 0  # query head 0 adds nothing
        b1 = lm.model.model.layers[1]  # block 1 passes its input through unchanged
        b1.self_attn.o_proj.weight.zero_()
        b1.mlp.down_proj.weight.zero_()
    imp = measure_importance(lm, _windows(lm), s.head_dim)
    assert imp[1].influence < 1e-6 < min(imp[0].influence, imp[2].influence)
    plan = make_plan(s, StructuredConfig(ffn=0.25, heads=1, blocks=1, multiple=1), imp)
    assert plan.blocks == [0, 2]
    assert not (plan.channels[0] < 40).any()
    assert 0 not in plan.q_heads[0].tolist() and 1 in plan.q_heads[0].tolist()  # head 1 is head 0's group mate


def test_target_sets_ffn_width():
    lm = tiny_model("llama")
    before = Shape.of(lm.config)
    plan = make_plan(before, StructuredConfig(target=0.6, multiple=8), measure_importance(lm, _windows(lm), before.head_dim))
    after = plan.shape.linear_weights()
    assert after <= 0.6 * before.linear_weights() and plan.shape.inter % 8 == 0
    bigger = Shape(before.hidden, plan.shape.inter + 8, before.q_heads, before.kv_heads, before.head_dim, before.n_blocks)
    assert bigger.linear_weights() > 0.6 * before.linear_weights()  # the widest that fits


@pytest.mark.parametrize("kw", [dict(heads=2), dict(kv_groups=2), dict(blocks=2), dict(ffn=1.0), dict(ffn=0.2, target=0.5),
                                dict(target=0.01)])
def test_refuses_impossible_settings(kw):
    lm = tiny_model("llama")
    with pytest.raises(SlimlmError):
        prune_structured(lm, StructuredConfig(**kw), _windows(lm))


def test_cli_prune_writes_loadable_dir(tiny_dir, tmp_path):
    import slimlm

    out = tmp_path / "pruned"
    code, stdout, err = run_cli("prune", tiny_dir, "-o", out, "--ffn", "0.25", "--heads", "1", "--multiple", "8",
                                "--calib-tokens", "128", "--calib-seq-len", "64", "-q")
    assert code == 0, err
    assert "FFN width 120" in stdout
    lm = slimlm.load(out)
    assert lm.config.intermediate_size == 120 and lm.config.num_attention_heads == 2
    code, _, err = run_cli("prune", tiny_dir, "-o", out, "--ffn", "0.25")
    assert code == 1 and "already exists" in err
    code, _, err = run_cli("prune", tiny_dir, "-o", tmp_path / "x", "--heads", "5", "--calib-tokens", "128",
                           "--calib-seq-len", "64")
    assert code == 1 and "--heads" in err and not (tmp_path / "x").exists()
