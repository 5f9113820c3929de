"""The CLI end to end on a tiny model, and every bad input: one sentence, non-zero exit, nothing written."""

import json
import shutil

import pytest
import torch

from conftest import run_cli
from slimlm.models import builtin_path, save_hf_dir
from slimlm.models.tiny import tiny_model


def test_compress_eval_info_bench_generate(tiny_dir, tmp_path):
    out = tmp_path / "w4"
    code, stdout, err = run_cli("compress", tiny_dir, "--recipe", "rtn:bits=4,group=32", "-o", out, "--json", "-q")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["bpw"] == 5.0 and res["size_bytes"] > 0 and (out / "slimlm.json").is_file()

    code, stdout, err = run_cli("eval", out, "--reference", tiny_dir, "--max-tokens", "300", "--seq-len", "64", "--json", "-q")
    assert code == 0, err
    res = json.loads(stdout)
    assert {"ppl", "tokens", "kl", "top1", "bpw", "size_bytes", "tasks"} <= set(res)
    assert res["tokens"] == 300 - 5 and res["kl"] > 0

    code, stdout, err = run_cli("info", out, "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["recipe"] == "rtn:bits=4,group=32" and len(res["layers"]) == 14 and res["bpw"] == 5.0
    from slimlm.kernels import isa

    assert res["kernels"]["isa"] == isa() and res["kernels"]["layers"] == {f"int8/{isa()}": 14}
    assert res["kernels"]["formats_without_kernel"] == []
    assert {e["kernel"] for e in res["layers"].values()} == {f"int8/{isa()}"}

    code, stdout, err = run_cli("bench", out, "--json", "--runs", "1", "--prompt-tokens", "16", "--decode-tokens", "4")
    assert code == 0, err
    res = json.loads(stdout)
    assert {"prefill_tps", "decode_tps", "peak_rss_bytes", "size_bytes", "bpw"} <= set(res)
    assert res["kernels"]["isa"] == isa() and res["runtime"] == "lean-fused"
    assert res["threads_chosen_by"] == "measurement" and res["threads"] >= 1

    code, stdout, err = run_cli("generate", out, "def f(x):", "--max-new-tokens", "5", "--no-chat")
    assert code == 0, err
    # speculative, with the model as its own draft and with an RTN draft: greedy text unchanged
    code, same, err = run_cli("generate", out, "def f(x):", "--max-new-tokens", "5", "--no-chat", "--draft", out)
    assert code == 0 and same == stdout, err
    assert "accepted (100%)" in err, err
    code, spec, err = run_cli("generate", out, "def f(x):", "--max-new-tokens", "5", "--no-chat", "--draft-bits", "3")
    assert code == 0 and spec == stdout and "speculative:" in err, err
    code, spec, err = run_cli("generate", out, "def f(x):", "--max-new-tokens", "5", "--no-chat", "--draft-bits", "3",
                              "--draft-head-bits", "4")
    assert code == 0 and spec == stdout and "speculative:" in err, err
    code, _, err = run_cli("generate", out, "x", "--draft-bits", "3", "--draft-head-bits", "1")
    assert code != 0 and "head bits" in err
    code, _, err = run_cli("generate", out, "x", "--draft", out, "--draft-bits", "3")
    assert code != 0 and "not both" in err

    code, stdout, _ = run_cli("info", out)
    assert "model.layers.1.mlp.down_proj" in stdout and f"int8/{isa()}" in stdout and f"kernels: {isa()}" in stdout


def test_recipe_file_and_text_file(tiny_dir, tmp_path):
    rf = tmp_path / "r.yaml"
    rf.write_text("stages:\n- method: rtn\n  options: {bits: 3, group: 32}\n- method: rtn\n  options: {bits: 8}\n  layers: ['*.down_proj']\n")
    out = tmp_path / "m"
    code, _, err = run_cli("compress", tiny_dir, "--recipe", rf, "-o", out, "-q")
    assert code == 0, err
    layers = json.loads((out / "slimlm.json").read_text())["layers"]
    assert layers["model.layers.0.mlp.down_proj"]["meta"]["bits"] == 8
    assert layers["model.layers.0.mlp.up_proj"]["meta"]["bits"] == 3
    tf = tmp_path / "mytext.txt"
    tf.write_text("import os\nprint(os.getcwd())\n" * 30)
    code, stdout, err = run_cli("eval", out, "--text", tf, "--json", "-q")
    assert code == 0, err
    assert json.loads(stdout)["text"] == str(tf)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("bad")
    (d / "bad.gguf").write_bytes(b"GGUF" + bytes(64))
    with open(builtin_path("smollm2-135m"), "rb") as f:
        (d / "cut.gguf").write_bytes(f.read(4 << 20))
    shutil.copytree(tiny_dir, d / "trunc")
    st = d / "trunc" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    nan = tiny_model("llama")
    with torch.no_grad():
        nan.model.model.layers[0].self_attn.k_proj.weight[0, 0] = float("nan")
    save_hf_dir(nan.model, nan.tokenizer, d / "nan")
    other = tiny_model("llama", seed=3)
    other.tokenizer.add_tokens(["<other>"])
    save_hf_dir(other.model, other.tokenizer, d / "othertok")
    (d / "exists").mkdir()
    (d / "exists" / "keep.txt").write_text("mine")
    return d


BAD = [
    (["compress", "{d}/nope", "--recipe", "rtn"], "no such file or directory"),
    (["compress", "{d}/bad.gguf", "--recipe", "rtn"], "not a valid GGUF"),
    (["compress", "{d}/cut.gguf", "--recipe", "rtn"], "truncated or corrupt"),
    (["compress", "{d}/trunc", "--recipe", "rtn"], "truncated"),
    (["compress", "{tiny}", "--recipe", "awesome:bits=4"], "unknown method 'awesome'"),
    (["compress", "{tiny}", "--recipe", "rtn:bitz=4"], "unknown option 'bitz'"),
    (["compress", "{tiny}", "--recipe", "rtn:bits=9"], "bits must be in 2..8"),
    (["compress", "{tiny}", "--recipe", "rtn:bits=1"], "bits must be in 2..8"),
    (["compress", "{tiny}", "--recipe", "rtn:bits=4,group=4096"], "larger than the row length"),
    (["compress", "{tiny}", "--recipe", "rtn:bits=4,group=-8"], "group"),
    (["compress", "{d}/nan", "--recipe", "rtn"], "model.layers.0.self_attn.k_proj.weight"),
    (["eval", "{tiny}", "--reference", "{d}/othertok", "--max-tokens", "100"], "different tokenizer"),
    (["eval", "{tiny}", "--text", "{d}/missing.txt"], "no such file"),
    (["eval", "{tiny}", "--tasks", "{d}/missing.jsonl"], "no such file"),
    (["compress", "{tiny}", "--recipe", "rtn", "-o", "{d}/exists"], "already exists"),
]


@pytest.mark.parametrize("argv, msg", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_clear_sentence(bad_inputs, tiny_dir, argv, msg):
    out = bad_inputs / "out-should-not-exist"
    argv = [a.format(d=bad_inputs, tiny=tiny_dir) for a in argv]
    if argv[0] == "compress" and "-o" not in argv:
        argv += ["-o", str(out)]
    code, stdout, err = run_cli(*argv, "-q")
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("slimlm: error: ") and msg in lines[-1], err
    assert "Traceback" not in err
    assert not out.exists()
    assert (bad_inputs / "exists" / "keep.txt").read_text() == "mine"
    assert not [p for p in bad_inputs.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_argparse_errors_exit_non_zero():
    code, _, err = run_cli("compress")
    assert code == 2 and "required" in err
    code, _, err = run_cli("frobnicate")
    assert code == 2


def test_damaged_compressed_models_end_in_one_sentence(tiny_dir, tmp_path):
    """A truncated packed file, or a layer whose stored shape disagrees with its codes, is refused
    before any kernel reads it: one line on stderr, a non-zero exit, no traceback."""
    import shutil

    out = tmp_path / "w4"
    assert run_cli("compress", tiny_dir, "--recipe", "rtn:bits=4,group=32", "-o", out, "-q")[0] == 0
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    raw = (cut / "packed.safetensors").read_bytes()
    (cut / "packed.safetensors").write_bytes(raw[: len(raw) // 2])
    lie = tmp_path / "lie"
    shutil.copytree(out, lie)
    man = json.loads((lie / "slimlm.json").read_text())
    man["layers"]["model.layers.0.mlp.up_proj"]["meta"]["in_features"] *= 2  # codes now too short for the shape
    (lie / "slimlm.json").write_text(json.dumps(man))
    for bad in (cut, lie):
        for cmd in (("bench", bad, "--runs", "1", "--decode-tokens", "2"), ("generate", bad, "x", "--max-new-tokens", "2")):
            code, _, err = run_cli(*cmd)
            assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_sequence_past_the_cache_limit_is_one_clear_error(tiny_dir):
    import slimlm
    from slimlm.errors import SlimlmError
    from slimlm.runtime.lean import LeanModel, RuntimeConfig

    lean = LeanModel(slimlm.load(tiny_dir).model, RuntimeConfig(max_seq=8))
    lean.prefill([1, 2, 3, 4, 5, 6])
    lean.step(7)
    lean.step(8)
    with pytest.raises(SlimlmError, match="past this runtime's limit of 8"):
        lean.step(9)
