"""The sweep: presets from the registry, a store keyed by model + recipe + data, resume
after an interruption, failed recipes, the CLI, and Ray tasks on a local cluster."""

import json
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from conftest import run_cli
from slimlm.compress import CalibrationConfig, Recipe
from slimlm.errors import SlimlmError
from slimlm.eval.run import EvalConfig
from slimlm.fit.presets import BITS, default_presets, demo_presets, fit_candidates, method_presets
from slimlm.methods import METHODS, Kind, load_all, register
from slimlm.methods.affine import quantize_rtn
from slimlm.sweep import SweepConfig, format_table, recipe_key, run_sweep

FAST_EVAL = EvalConfig(seq_len=64, max_tokens=256)
FAST_CALIB = CalibrationConfig(n_windows=2, seq_len=64)


def cfg_for(out, recipes, **kw):
    return SweepConfig(recipes=tuple(recipes), out_dir=str(out), eval=FAST_EVAL, calibration=FAST_CALIB,
                       bench=False, **kw)


INTERRUPT = {"on": False, "crash": False, "calls": 0}


@dataclass(frozen=True)
class FakeConfig:
    SHOWN = ("bits",)
    bits: int = 4


@pytest.fixture
def fake_method():
    """A quantizer registered only for the test: RTN in groups of 32 that can simulate Ctrl-C."""
    load_all()

    def fake(weight, stats, config):
        INTERRUPT["calls"] += 1
        if INTERRUPT["on"]:
            raise KeyboardInterrupt
        if INTERRUPT["crash"]:
            raise RuntimeError("a bug in the method")
        return quantize_rtn(weight, config.bits, 32)

    register("faketest", FakeConfig)(fake)
    INTERRUPT.update(on=False, crash=False, calls=0)
    yield "faketest"
    METHODS.pop("faketest")


def test_presets_cover_every_registered_method_and_new_ones(fake_method):
    presets = default_presets()
    for name, spec in load_all().items():
        if method_presets(spec):  # a method whose config refuses every derived preset has none
            assert any(name in [s.method for s in Recipe.parse(p).stages] for p in presets), name
    fake = [p for p in presets if p.startswith("faketest")]
    assert fake == [f"faketest:bits={b}" for b in BITS]  # picked up without any change to the sweep
    assert presets[0].startswith("rtn:")
    assert any(p.startswith("faketest") for p in demo_presets())
    assert "faketest:bits=2" in fit_candidates(("faketest",))
    with pytest.raises(SlimlmError, match="unknown method"):
        fit_candidates(("nosuchmethod",))


def test_presets_compose_other_kinds_with_rtn():
    @dataclass(frozen=True)
    class P:
        sparsity: float = 0.5

    load_all()
    register("fakeprune", P, kind=Kind.PRUNE)(lambda w, s, c: quantize_rtn(w, 8, 32))
    try:
        got = method_presets(METHODS["fakeprune"])
        assert got == ["fakeprune+rtn:bits=4,group=64", "fakeprune+rtn:bits=8,group=64"]
    finally:
        METHODS.pop("fakeprune")


def test_key_depends_on_model_recipe_and_data():
    r4, r3 = Recipe.parse("rtn:bits=4,group=32"), Recipe.parse("rtn:bits=3,group=32")
    base = cfg_for("a", [])
    k = recipe_key("m", r4, base)
    assert k == recipe_key("m", r4, replace(base, out_dir="elsewhere", keep_models=True))
    assert k != recipe_key("m2", r4, base)
    assert k != recipe_key("m", r3, base)
    assert k != recipe_key("m", r4, replace(base, eval=replace(FAST_EVAL, max_tokens=128)))
    # calibration data matters only to recipes that use it
    assert k == recipe_key("m", r4, replace(base, calibration=replace(FAST_CALIB, seed=1)))


def _same_quality(a, b):
    """Rows equal but for what depends on the clock: compress seconds, and the saved size
    within a few bytes (the directory's manifest records the compression time as text)."""
    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("compress_s", "size_bytes")} for r in rows]

    sizes = all(abs(ra.get("size_bytes", 0) - rb.get("size_bytes", 0)) <= 16 for ra, rb in zip(a, b))
    return len(a) == len(b) and sizes and strip(a) == strip(b)


def test_resume_after_interruption_gives_the_same_table(tiny_dir, tmp_path, fake_method):
    recipes = ["rtn:bits=4,group=32", "faketest:bits=3", "rtn:bits=2,group=32", "rtn:bits=4,group=100"]
    INTERRUPT["on"] = True
    with pytest.raises(KeyboardInterrupt):
        run_sweep(str(tiny_dir), cfg_for(tmp_path / "a", recipes), progress=False)
    assert len(list((tmp_path / "a" / "results").glob("*.json"))) == 2  # reference and rtn 4-bit stored
    INTERRUPT["on"] = False
    resumed = run_sweep(str(tiny_dir), cfg_for(tmp_path / "a", recipes), progress=False)
    assert resumed.computed == 3  # the fake, rtn 2-bit and the refused recipe; nothing recomputed
    fresh = run_sweep(str(tiny_dir), cfg_for(tmp_path / "b", recipes), progress=False)
    assert _same_quality(resumed.rows, fresh.rows)
    assert [r["recipe"] for r in resumed.rows] == ["none"] + [Recipe.parse(r).to_string() for r in recipes]
    calls = INTERRUPT["calls"]
    again = run_sweep(str(tiny_dir), cfg_for(tmp_path / "a", recipes), progress=False)
    assert again.computed == 0 and INTERRUPT["calls"] == calls  # a finished sweep re-renders without work
    assert format_table(again.rows) == format_table(resumed.rows)
    failed = resumed.rows[-1]
    assert "group size 100" in failed["error"] and "failed: stage" in format_table(resumed.rows)
    ok = [r for r in resumed.rows if "error" not in r]
    assert all(0 < r["bpw"] for r in ok) and ok[0]["kl"] == 0.0 and ok[1]["kl"] > 0
    stored = json.loads((tmp_path / "a" / "sweep.json").read_text())
    assert [r["recipe"] for r in stored["rows"]] == [r["recipe"] for r in again.rows]
    assert not (tmp_path / "a" / "models").exists() or not any((tmp_path / "a" / "models").iterdir())


def test_a_crashing_method_is_shown_not_stored_and_retried(tiny_dir, tmp_path, fake_method):
    INTERRUPT["crash"] = True
    res = run_sweep(str(tiny_dir), cfg_for(tmp_path, ["faketest:bits=3", "rtn:bits=4,group=32"]), progress=False)
    assert res.crashed == ["faketest:bits=3"] and res.computed == 2
    assert "crashed (RuntimeError: a bug in the method)" in res.rows[1]["error"] and "ppl" in res.rows[2]
    INTERRUPT["crash"] = False
    again = run_sweep(str(tiny_dir), cfg_for(tmp_path, ["faketest:bits=3", "rtn:bits=4,group=32"]), progress=False)
    assert again.computed == 1 and "error" not in again.rows[1]


def test_time_budget_stops_starting_recipes(tiny_dir, tmp_path):
    res = run_sweep(str(tiny_dir), cfg_for(tmp_path, ["rtn:bits=4,group=32", "rtn:bits=3,group=32"],
                                           time_budget_s=1e-9), progress=False)
    assert [r["recipe"] for r in res.rows] == ["none"]
    assert res.skipped == ["rtn:bits=4,group=32", "rtn:bits=3,group=32"]


def test_cli_sweep_with_recipes_file_writes_table_and_report(tiny_dir, tmp_path):
    f = tmp_path / "recipes.txt"
    f.write_text("# two recipes\nrtn:bits=4,group=32\n\nrtn:bits=8,group=64  # near lossless\n")
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("sweep", tiny_dir, "--recipes", f, "--no-bench", "--seq-len", 64,
                                   "--max-tokens", 256, "--out", out, "--quiet")
    assert code == 0, stderr
    assert "rtn:bits=4,group=32" in stdout and "rtn:bits=8,group=64" in stdout and "ratio" in stdout
    assert (out / "report.html").is_file() and (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    code, stdout, stderr = run_cli("sweep", tiny_dir, "--recipes", tmp_path / "missing.txt", "--out", out)
    assert code == 1 and "no such file" in stderr


def test_ray_tasks_on_a_local_cluster(tiny_dir, tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed in this environment")
    exe = shutil.which("ray", path=str(Path(ray.__file__).parents[4] / "bin")) or shutil.which("ray")
    if exe is None:
        pytest.skip("the ray command-line tool is not on PATH")
    start = subprocess.run([exe, "start", "--head", "--port=0", "--num-cpus=1", "--include-dashboard=false",
                            "--disable-usage-stats"], capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr[-1000:]
    try:
        address = next(ln.split("'")[1] for ln in start.stdout.splitlines() if "ray start --address=" in ln)
        recipes = ["rtn:bits=4,group=32", "rtn:bits=2,group=32"]
        remote = run_sweep(str(tiny_dir), cfg_for(tmp_path / "ray", recipes, ray_address=address), progress=False)
        ray.shutdown()
    finally:
        subprocess.run([exe, "stop", "--force"], capture_output=True, timeout=120)
    local = run_sweep(str(tiny_dir), cfg_for(tmp_path / "local", recipes), progress=False)
    assert remote.computed == 3
    assert _same_quality(remote.rows, local.rows)


@pytest.mark.slow
def test_sweep_on_the_embedded_model(tmp_path):
    cfg = SweepConfig(recipes=("rtn:bits=8,group=64", "rtn:bits=3,group=64"), out_dir=str(tmp_path),
                      eval=EvalConfig(max_tokens=1024), bench=False)
    rows = run_sweep("smollm2-135m", cfg, progress=False).rows
    ref, r8, r3 = rows
    assert ref["bpw"] == 32.0 and r8["bpw"] == pytest.approx(8.5) and r3["bpw"] == pytest.approx(3.5)
    assert r8["kl"] < 0.01 < r3["kl"] and r3["ppl"] > 1.5 * ref["ppl"]  # 3-bit RTN hurts this model (MODEL-NOTES)
    assert r3["size_bytes"] < r8["size_bytes"] < ref["size_bytes"]  # the float32 embeddings stay: ~113 MB of each
