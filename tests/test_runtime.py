"""The lean runtime: logits against transformers, sampling, cache reuse, speculative decoding.

Tolerance of the lean forward against the transformers forward (float32, tiny models of
width 64): 1e-4 absolute on logits of magnitude ~3 — the same math in another order
(fused q/k/v, grouped attention, torch.rms_norm).
"""

import pytest
import torch

from slimlm.compress import compress_model
from slimlm.formats.linear import Kernel
from slimlm.models.tiny import tiny_model
from slimlm.runtime import GenerationConfig, generate_ids
from slimlm.runtime.generate import Chat, sample_next
from slimlm.runtime.lean import LeanModel, RuntimeConfig
from slimlm.runtime.speculative import SpecStats, draft_model, speculative_ids, speculative_pair

ATOL = 1e-4


def _ids(n, seed=1):
    return torch.randint(0, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _lean_error(m, ids, chunks, runtime=RuntimeConfig()):
    """Largest |lean − transformers| over the logits of `ids`: the first chunks as batched
    extends of the given lengths (a prompt, a verification batch), then one step per token."""
    with torch.no_grad():
        ref = m(torch.tensor([ids])).logits[0]
    lean = LeanModel(m, runtime)
    got, at = [], 0
    for n in chunks:
        got.append(lean.extend(ids[at:at + n], all_logits=True))
        at += n
    got.append(torch.stack([lean.step(t) for t in ids[at:]]))
    return (torch.cat(got) - ref).abs().max(), lean


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_lean_logits_match_transformers(model_type, fused):
    """Both the PyTorch blocks and the fused C step (csrc/lean.c, dense float32 rows here):
    a 16-token first chunk, a 3-token chunk (speculative verification), then single steps."""
    err, lean = _lean_error(tiny_model(model_type).model, _ids(24), (16, 3), RuntimeConfig(fused=fused))
    assert lean.fused is fused
    assert err < ATOL


@pytest.mark.parametrize("fused", [True, False])
def test_sliding_window_layers_mask_old_keys(fused):
    """Mistral with a window of 8 keys over 24 tokens: the mask matters for the later ones."""
    m = tiny_model("mistral", sliding_window=8).model
    ids = _ids(24)
    with torch.no_grad():
        ref = m(torch.tensor([ids])).logits[0]
        full = tiny_model("mistral").model(torch.tensor([ids])).logits[0]
    assert (full[12:] - ref[12:]).abs().max() > 0.01  # the window changes the logits
    err, _ = _lean_error(m, ids, (10,), RuntimeConfig(fused=fused))
    assert err < ATOL


def test_fused_dense_rows_with_odd_widths():
    """Widths that are not multiples of 16 (72, 100) and 5 output rows per head group: the
    fused step's masked row tails and leftover rows against transformers."""
    m = tiny_model("llama", hidden_size=72, intermediate_size=100, num_attention_heads=4, num_key_value_heads=1).model
    err, lean = _lean_error(m, _ids(10), (5,))
    assert lean.fused
    assert err < ATOL


@pytest.mark.parametrize("window", [None, 8])
def test_fused_attention_with_head_dim_64(window):
    """Head dimension 64 (the embedded model's) takes lean.c's vectorised attention row; against
    transformers over 24 positions, with and without a sliding window."""
    kw = dict(sliding_window=window) if window else {}
    m = tiny_model("mistral", hidden_size=128, num_attention_heads=2, num_key_value_heads=1, **kw).model
    assert m.config.hidden_size // m.config.num_attention_heads == 64
    err, lean = _lean_error(m, _ids(24), (9,))
    assert lean.fused
    assert err < ATOL


def test_fused_head_equals_the_module_head():
    """The output head runs in C (lean_linear) on the fused path: same logits as the head module
    applied to the same normed hidden state, for a float head and an 8-bit runtime head."""
    from slimlm.kernels import extension

    m = tiny_model("llama").model
    for rt in (RuntimeConfig(), RuntimeConfig(head_bits=8, head_group=16)):
        lean = LeanModel(m, rt)
        assert lean._head_plan is not None
        x = torch.randn(3, lean.dim)
        got = torch.empty(3, lean.head.out_features)
        extension().lean_linear(lean._head_plan, x.data_ptr(), 3, got.data_ptr())
        assert (got - lean.head(x)).abs().max() < 1e-4
        with pytest.raises(ValueError, match="rows"):
            extension().lean_linear(lean._head_plan, x.data_ptr(), extension().LEAN_MAX_T + 1, got.data_ptr())


def test_fused_step_serves_int8_kernels_only():
    """The fused step reads IntQuant codes in the int8-path layout; a float-path or reference
    model runs its blocks in PyTorch instead."""
    lm = tiny_model("llama")
    compress_model(lm, "rtn:bits=4,group=16", progress=False)
    assert LeanModel(lm.model, RuntimeConfig()).fused == (LeanModel(lm.model).blocks[0].qkv.kernel.path.value == "int8")
    assert not LeanModel(lm.model, RuntimeConfig(kernel=Kernel.REFERENCE)).fused


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fused_int8_step_equals_the_pytorch_blocks(bits, monkeypatch):
    """Same int8-activation products in both: the fused step only moves the rest into C, so
    the logits agree to float rounding — amplified where an activation lands on a rounding
    boundary of its int8 block, hence 1 % of the largest logit."""
    monkeypatch.setenv("SLIMLM_INTQ_PATH", "int8")
    lm = tiny_model("qwen2")  # q/k/v biases
    compress_model(lm, f"rtn:bits={bits},group=16", progress=False)
    ids = _ids(12)
    fused, torch_ = LeanModel(lm.model, RuntimeConfig(fused=True)), LeanModel(lm.model, RuntimeConfig(fused=False))
    assert fused.fused and not torch_.fused
    a = torch.cat([fused.extend(ids[:4], all_logits=True), torch.stack([fused.step(t) for t in ids[4:]])])
    b = torch.cat([torch_.extend(ids[:4], all_logits=True), torch.stack([torch_.step(t) for t in ids[4:]])])
    assert (a - b).abs().max() < 0.01 * b.abs().max()


@pytest.mark.parametrize("path", ["float", "int8"])
@pytest.mark.parametrize("kernel", [Kernel.REFERENCE, Kernel.AUTO, Kernel.CPU])
def test_lean_runs_compressed_layers_with_each_kernel(kernel, path, monkeypatch):
    """The float kernels agree with the reference to float rounding; the int8-activation
    kernels round each 32-column activation block to int8 (step max|x|/127, as llama.cpp's
    Q8 activations), about 0.5 % of the output per product: within 3 % of the largest logit."""
    monkeypatch.setenv("SLIMLM_INTQ_PATH", path)
    lm = tiny_model("llama")
    compress_model(lm, "rtn:bits=3,group=16", progress=False)
    ids = _ids(20)
    with torch.no_grad():
        ref = lm.model(torch.tensor([ids])).logits[0]
    lean = LeanModel(lm.model, RuntimeConfig(kernel=kernel))
    got = torch.cat([lean.extend(ids[:12], all_logits=True), torch.stack([lean.step(t) for t in ids[12:]])])
    exact = kernel is Kernel.REFERENCE or path == "float"
    assert (got - ref).abs().max() < (ATOL if exact else 0.03 * ref.abs().max())


def test_quantized_head_is_close_and_counted():
    m = tiny_model("llama").model
    ids = _ids(10)
    full = LeanModel(m, RuntimeConfig()).extend(ids)
    lean8 = LeanModel(m, RuntimeConfig(head_bits=8))
    q8 = lean8.extend(ids)
    assert 0 < (q8 - full).abs().max() < 0.05
    assert lean8.bytes_per_token() < LeanModel(m, RuntimeConfig()).bytes_per_token()


def test_sampling_is_reproducible_with_a_seed():
    m = tiny_model("llama").model
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a = list(generate_ids(m, _ids(5), cfg))
    b = list(generate_ids(m, _ids(5), cfg))
    c = list(generate_ids(m, _ids(5), GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=8)))
    assert a == b and len(a) == 12 and a != c
    logits = torch.tensor([0.0, 5.0, 1.0])
    assert sample_next(logits, GenerationConfig(top_k=1, temperature=2.0), torch.Generator()) == 1


def test_greedy_matches_the_transformers_loop():
    from slimlm.runtime.generate import _generate_ids_transformers

    m = tiny_model("qwen3").model
    cfg = GenerationConfig(max_new_tokens=10)
    assert list(generate_ids(m, _ids(6), cfg)) == list(_generate_ids_transformers(m, _ids(6), cfg, (), None))


def test_kv_cache_is_reused_across_turns():
    m = tiny_model("llama").model
    lean = LeanModel(m, RuntimeConfig())
    turn1 = _ids(12)
    reply = list(generate_ids(lean, turn1, GenerationConfig(max_new_tokens=5)))
    turn2 = turn1 + reply + _ids(4, seed=3)
    calls = []
    orig = lean.extend
    lean.extend = lambda ids, all_logits=False: calls.append(len(ids)) or orig(ids, all_logits)
    second = list(generate_ids(lean, turn2, GenerationConfig(max_new_tokens=5)))
    # the prefill computed only what was not cached: the last reply token (never fed back) and the new turn
    assert calls[0] == 1 + 4
    fresh = list(generate_ids(m, turn2, GenerationConfig(max_new_tokens=5)))
    assert second == fresh


def test_chat_keeps_history(tiny):
    chat = Chat(tiny, GenerationConfig(max_new_tokens=4))
    chat.say("hello")
    chat.say("again")
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_greedy_equals_plain_greedy(k):
    lm = tiny_model("llama")
    cfg = GenerationConfig(max_new_tokens=24)
    plain = list(generate_ids(lm.model, _ids(8), cfg))
    target, draft = speculative_pair(lm.model, draft_bits=2)
    stats = SpecStats()
    spec = list(speculative_ids(target, draft, _ids(8), cfg, k=k, stats=stats))
    assert spec == plain
    assert stats.emitted == 24 and 0 <= stats.accepted <= stats.drafted


def test_speculative_with_the_model_as_its_own_draft_accepts_everything():
    m = tiny_model("llama").model
    stats = SpecStats()
    target, draft = LeanModel(m), LeanModel(m)
    list(speculative_ids(target, draft, _ids(8), GenerationConfig(max_new_tokens=20), k=4, stats=stats))
    assert stats.acceptance == 1.0


def test_speculative_sampling_keeps_the_target_distribution():
    """Exact rule: the first sampled token's frequencies follow the target's distribution
    (top-k 4, so 400 samples estimate it well), not the draft's."""
    from slimlm.runtime.generate import probs

    m = tiny_model("llama").model
    draft = draft_model(m, bits=2)
    cfg0 = GenerationConfig(max_new_tokens=1, temperature=1.0, top_k=4)
    p = probs(LeanModel(m).prefill(_ids(6)), cfg0)
    q = probs(LeanModel(draft).prefill(_ids(6)), cfg0)
    target_lean, draft_lean = LeanModel(m), LeanModel(draft)
    n, counts = 400, torch.zeros_like(p)
    for s in range(n):
        cfg = GenerationConfig(max_new_tokens=1, temperature=1.0, top_k=4, seed=s)
        counts[next(speculative_ids(target_lean, draft_lean, _ids(6), cfg, k=2))] += 1
    tv = 0.5 * (counts / n - p).abs().sum()
    assert tv < 0.1, (tv, 0.5 * (p - q).abs().sum())  # expected ~0.03 for 400 samples over 4 tokens


def test_fused_step_checks_its_arguments():
    """The C entry points refuse plans with inconsistent shapes and steps that overrun the cache."""
    from slimlm.kernels import extension

    lean = LeanModel(tiny_model("llama").model, RuntimeConfig())
    assert lean.fused
    ext = extension()
    b = lean.blocks[0]
    ln = b.ln1.data_ptr()
    bad = (ln, ln, 0, 0, 4, 2, b.ffn, 0, b.o.plan(), b.o.plan(), b.gate_up.plan(), b.down.plan())  # o where qkv goes
    with pytest.raises(ValueError, match="inconsistent shapes"):
        ext.lean_new(lean.dim, lean.hd, 1e-5, 64, lean.cos.data_ptr(), lean.sin.data_ptr(), lean.norm.data_ptr(), [bad])
    lean.extend(_ids(3))
    kp, vp = lean._cache_ptrs
    n = ext.LEAN_MAX_T + 1
    x = torch.zeros(n, lean.dim)
    with pytest.raises(ValueError, match="do not fit"):
        ext.lean_step(lean._plan, x.data_ptr(), n, 3, kp.data_ptr(), vp.data_ptr(), lean.k_cache[0].shape[1])


@pytest.mark.parametrize("isa", ["avx512_vnni", "avx_vnni", "avx2", "neon_dotprod", "scalar"])
@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_fused_step_on_every_isa(isa, model_type):
    """The fused step with each ISA's loops (int8 kernels, and the dense rows, SiLU and attention
    rows of lean.c: AVX-512, AVX2 or portable): dense float32 against transformers; a 4-bit model
    against its own PyTorch blocks on the best ISA, to the int8 path's rounding."""
    import os

    from slimlm.kernels import isas, set_isa

    if isa not in isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels (it runs {', '.join(isas())})")
    lm = tiny_model(model_type, sliding_window=8) if model_type == "mistral" else tiny_model(model_type)
    ids = _ids(40)
    q = tiny_model(model_type)
    compress_model(q, "rtn:bits=4,group=32", progress=False)
    ref_q = LeanModel(q.model, RuntimeConfig(fused=False))
    want = torch.stack([ref_q.prefill(ids[:1]), *[ref_q.step(t) for t in ids[1:]]])
    set_isa(isa)
    try:
        err, lean = _lean_error(lm.model, ids, (16, 3))
        assert lean.fused and err < ATOL
        fq = LeanModel(q.model, RuntimeConfig())
        assert fq.fused
        got = torch.stack([fq.prefill(ids[:1]), *[fq.step(t) for t in ids[1:]]])
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4  # same sums, another order
    finally:
        set_isa(os.environ.get("SLIMLM_ISA"))
