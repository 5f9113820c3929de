"""The torch-free runtime (slimlm/runtime/native.py): an export of a tiny compressed model
runs the same fused C step as the torch lean runtime — equal logits and greedy tokens —
in a process that never imports torch; damaged exports end with one sentence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import slimlm
from slimlm.compress import CalibrationConfig, compress_model
from slimlm.errors import SlimlmError
from slimlm.formats.store import save_compressed
from slimlm.models.tiny import tiny_model
from slimlm.runtime.lean import LeanModel, RuntimeConfig
from slimlm.runtime.native import MANIFEST, WEIGHTS, NativeModel, export_native

RECIPE = "rtn:bits=4,group=32+rtn:bits=8,group=32@lm_head"
ROOT = Path(__file__).resolve().parents[1]


def _saved(tmp: Path, model_type: str = "llama", recipe: str = RECIPE, calib=None) -> Path:
    lm = tiny_model(model_type)
    compress_model(lm, recipe, calib, progress=False) if calib else compress_model(lm, recipe, progress=False)
    save_compressed(lm, tmp / model_type)
    return tmp / model_type


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("native")
    src = _saved(tmp)
    export_native(src, tmp / "out")
    return src, tmp / "out"


def _cli(*args, check_torch=True):
    """`slimlm ARGS` in a fresh interpreter; (rc, stdout, stderr), and whether torch was imported."""
    code = ("import sys\nfrom slimlm.cli import main\nrc = main(sys.argv[1:])\n"
            "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', file=sys.stderr)\nsys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])  # qwen2: q/k/v biases; qwen3: qk-norm
def test_native_equals_the_torch_lean_runtime(model_type, tmp_path):
    src = _saved(tmp_path, model_type)
    export_native(src, tmp_path / "out")
    nm = NativeModel(tmp_path / "out", threads=1)
    lean = LeanModel(slimlm.load(str(src)).model, RuntimeConfig(threads=1))
    ids = [(7 * i + 3) % 384 for i in range(2 * nm.max_t + 5)]  # three fused chunks
    for i in range(0, len(ids), nm.max_t):  # the torch runtime in the same chunking
        ref = lean.extend(ids[i:i + nm.max_t]).numpy()
    got = nm.prefill(ids)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    toks_ref, toks = [], []
    for _ in range(24):
        toks_ref.append(int(ref.argmax()))
        toks.append(int(got.argmax()))
        ref, got = lean.step(toks_ref[-1]).numpy(), nm.step(toks[-1])
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert toks == toks_ref


@pytest.mark.parametrize("bits,sym", [(2, False), (3, True), (5, False), (6, True), (8, True)])
def test_embedding_rows_decode_from_the_head_codes(bits, sym, tmp_path):
    """The tied embedding's rows, decoded in numpy from the head's int8-path codes, equal the
    compressed embedding's rows exactly, for every plane combination of the layout."""
    lm = tiny_model("llama")
    compress_model(lm, f"rtn:bits=4,group=32+rtn:bits={bits},group=32,sym={str(sym).lower()}@lm_head", progress=False)
    export_native(lm, tmp_path / "out")
    ids = [0, 5, 383, 5, 100]
    want = lm.model.get_input_embeddings()(torch.tensor(ids)).numpy()
    assert np.array_equal(NativeModel(tmp_path / "out").embed(ids), want)


def test_untied_float_embedding_is_stored_as_a_table(tmp_path):
    lm = tiny_model("llama", tie_word_embeddings=False)
    compress_model(lm, RECIPE, progress=False)
    res = export_native(lm, tmp_path / "out")
    assert res["embed"] == "table"
    nm = NativeModel(tmp_path / "out")
    assert np.array_equal(nm.embed([1, 2]), lm.model.get_input_embeddings().weight[[1, 2]].detach().numpy())
    lean = LeanModel(lm.model, RuntimeConfig(threads=1))
    assert int(nm.prefill([1, 2, 3]).argmax()) == int(lean.extend([1, 2, 3]).argmax())


def test_run_never_imports_torch(exported):
    _, out = exported
    rc, stdout, err = _cli("run", out, "Hello", "--max-new-tokens", "5", "--json")
    assert rc == 0 and "NOTORCH" in err, err
    assert isinstance(json.loads(stdout)["text"], str)
    rc, stdout, err = _cli("run", out, "--bench", "--json", "--threads", "1", "--prompt-tokens", "20",
                           "--decode-tokens", "4", "--runs", "1")
    res = json.loads(stdout)
    assert rc == 0 and "NOTORCH" in err and res["threads"] == 1 and not res["torch_imported"]
    assert res["prefill_tps"] > 0 and res["decode_tps"] > 0 and res["peak_rss_bytes"] > 0 and res["isa"]
    code = "import sys, slimlm.runtime.native, slimlm.cli; slimlm.runtime.native.extension(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout.strip() == "False"


def test_generation_greedy_sampling_and_limits(exported):
    _, out = exported
    nm = NativeModel(out, threads=1)
    ids = nm.prompt_ids("Once upon a time", chat=False)
    greedy = list(nm.generate_ids(ids, 8))
    assert greedy == list(nm.generate_ids(ids, 8))  # prefill restarts the cache
    a = list(nm.generate_ids(ids, 8, temperature=0.8, top_k=20, top_p=0.9, seed=3))
    assert a == list(nm.generate_ids(ids, 8, temperature=0.8, top_k=20, top_p=0.9, seed=3))
    assert all(0 <= t < nm.vocab for t in a)
    with pytest.raises(SlimlmError, match="past this model's limit"):
        list(nm.generate_ids(ids, nm.max_seq))
    with pytest.raises(SlimlmError, match="outside this model's vocabulary"):
        nm.prefill([nm.vocab])


def test_export_refuses_formats_without_the_int8_path(tmp_path):
    src = _saved(tmp_path, recipe="rtn:bits=4,group=32+vq:bits=2,dim=2,keep=0@model.layers.0.self_attn.o_proj",
                 calib=CalibrationConfig(n_windows=2, seq_len=32))
    with pytest.raises(SlimlmError) as e:
        export_native(src, tmp_path / "out")
    msg = str(e.value)
    assert "model.layers.0.self_attn.o_proj (vq)" in msg and "lm_head (dense)" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_output_is_refused_or_replaced_atomically(exported, tmp_path):
    src, _ = exported
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    rc, _, err = _cli("export-native", src, "-o", out)
    assert rc == 1 and "already exists" in err and (out / "keep").exists()
    rc, _, err = _cli("export-native", src, "-o", out, "--force", "--json")
    assert rc == 0, err
    assert not (out / "keep").exists() and (out / WEIGHTS).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left beside it


def _damaged(exported, tmp_path, edit) -> Path:
    import shutil

    d = tmp_path / "bad"
    shutil.copytree(exported[1], d)
    edit(d)
    return d


def _edit_manifest(fn):
    def edit(d):
        man = json.loads((d / MANIFEST).read_text())
        fn(man)
        (d / MANIFEST).write_text(json.dumps(man))
    return edit


def _truncate(d):
    with open(d / WEIGHTS, "r+b") as f:
        f.truncate((d / WEIGHTS).stat().st_size - 100)


def _drop_tensor(d):
    from safetensors.numpy import load_file, save_file

    t = load_file(str(d / WEIGHTS))
    del t["l1.down.scales"]
    save_file(t, str(d / WEIGHTS))


@pytest.mark.parametrize("edit,match", [
    (_truncate, "truncated"),
    (lambda d: (d / WEIGHTS).write_bytes(b"\xff" * 64), "not a valid safetensors"),
    (_drop_tensor, "has no tensor 'l1.down.scales'"),
    (_edit_manifest(lambda m: m.update(format_version=99)), "version 99"),
    (_edit_manifest(lambda m: m.update(dim=96)), "the manifest needs"),
    (_edit_manifest(lambda m: m["layers"][0].update(nq=3)), "the manifest needs"),
    (_edit_manifest(lambda m: m["head"].update(bits=9)), "damaged"),
    (_edit_manifest(lambda m: m["layers"][1].pop("ffn")), "damaged"),
    (lambda d: (d / MANIFEST).write_text("{"), "does not parse"),
])
def test_damaged_exports_end_with_one_sentence(exported, tmp_path, edit, match):
    d = _damaged(exported, tmp_path, edit)
    with pytest.raises(SlimlmError, match=match):
        NativeModel(d)
    rc, stdout, err = _cli("run", d, "hi", "--max-new-tokens", "2")
    lines = [ln for ln in err.splitlines() if ln not in ("TORCH", "NOTORCH")]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("slimlm: error:") and "Traceback" not in err
