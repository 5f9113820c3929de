import json
import math

import pytest
import torch
import torch.nn.functional as F

from slimlm.compress import compress_model
from slimlm.data import Task, MCItem, builtin_documents, eval_windows
from slimlm.errors import SlimlmError
from slimlm.eval import evaluate_task, evaluate_windows, same_tokenizer, size_report
from slimlm.eval.run import EvalConfig, evaluate
from slimlm.eval.tasks import choice_logprob, encode_pair
from slimlm.models.tiny import tiny_model, tiny_tokenizer


@pytest.fixture
def windows(tiny):
    text = "\n\n".join(d.text for d in builtin_documents("evaluation"))
    return eval_windows(tiny.tokenizer, text, seq_len=40, max_tokens=300)


def test_perplexity_follows_the_protocol(tiny, windows):
    r = evaluate_windows(tiny.model, windows, progress=False)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = tiny.model(w[None]).logits[0]
            nll += F.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
            n += len(w) - 1
    assert r["tokens"] == n == 300 - len(windows)
    assert math.isclose(r["ppl"], math.exp(nll / n), rel_tol=1e-5)


def test_kl_and_top1(tiny, windows):
    same = evaluate_windows(tiny.model, windows, reference=tiny.model, progress=False)
    assert same["kl"] == 0 and same["top1"] == 1
    other = tiny_model("llama", seed=0)
    compress_model(other, "rtn:bits=2,group=16", progress=False)
    r = evaluate_windows(other.model, windows, reference=tiny.model, progress=False)
    kl, agree, n = 0.0, 0, 0
    with torch.no_grad():
        for w in windows:
            p = F.log_softmax(tiny.model(w[None]).logits[0, :-1], -1)
            q = F.log_softmax(other.model(w[None]).logits[0, :-1], -1)
            kl += F.kl_div(q, p, log_target=True, reduction="sum").item()
            agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
            n += len(w) - 1
    assert r["kl"] > 0 and math.isclose(r["kl"], kl / n, rel_tol=1e-4)
    assert r["top1"] == agree / n < 1


def test_encode_pair_moves_trailing_space():
    tok = tiny_tokenizer()
    ctx, cont = encode_pair(tok, "The answer is ", "42")
    assert ctx == tok("The answer is", add_special_tokens=False)["input_ids"]
    assert tok.decode(ctx + cont) == "The answer is 42"
    ctx, _ = encode_pair(tok, "", "hello")
    assert ctx == [tok.eos_token_id]


def test_task_accuracy_matches_its_definition(tiny):
    items = [MCItem("def f(x):\n    return", ("x", "while True", "import os and then some"), 0),
             MCItem("The list", ("is sorted", "zz"), 1),
             MCItem("", ("a", "bb"), 0)]
    task = Task("t", tuple(items))
    r = evaluate_task(tiny.model, tiny.tokenizer, task, progress=False)
    acc = acc_norm = 0
    for it in items:
        lps = [choice_logprob(tiny.model, *encode_pair(tiny.tokenizer, it.context, " " + c)) for c in it.choices]
        acc += int(max(range(len(lps)), key=lambda i: lps[i]) == it.gold)
        acc_norm += int(max(range(len(lps)), key=lambda i: lps[i] / len(it.choices[i])) == it.gold)
    assert r == {"acc": acc / 3, "acc_norm": acc_norm / 3, "n": 3}


def test_reference_with_another_tokenizer_is_refused(tiny):
    other = tiny_model("llama", seed=1)
    other.tokenizer.add_tokens(["<extra>"])
    assert same_tokenizer(tiny.tokenizer, tiny_tokenizer())
    assert not same_tokenizer(tiny.tokenizer, other.tokenizer)
    with pytest.raises(SlimlmError, match="different tokenizer"):
        evaluate(tiny, EvalConfig(max_tokens=100), reference=other, progress=False)


def test_size_counts_exact_bits(tiny):
    assert size_report(tiny)["bpw"] == 32.0
    compress_model(tiny, "rtn:bits=4,group=32", progress=False)
    rep = size_report(tiny)
    assert rep["bpw"] == 4 + 32 / 32  # codes + fp16 scale and min per 32 weights
    from slimlm.formats.store import unique_state_dict

    dense = sum(t.numel() * t.element_size() for t in unique_state_dict(tiny.model).values())
    assert rep["size_bytes"] == dense + rep["linear_bits"] // 8  # tied embeddings once, packed bits exact


def test_evaluate_result_keys(tiny, tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps({"context": "x =", "choices": [" 1", " []"], "gold": i % 2}) for i in range(4)))
    r = evaluate(tiny, EvalConfig(max_tokens=200, tasks=(str(f),)), reference=tiny, progress=False)
    for k in ("ppl", "tokens", "kl", "top1", "bpw", "size_bytes", "tasks"):
        assert k in r
    assert set(r["tasks"]["t"]) == {"acc", "acc_norm", "n"} and r["tasks"]["t"]["n"] == 4
