"""Foundation benchmark: reference and RTN on the embedded model, load time, eval and decode speed.

    .venv/bin/python benchmarks/foundation.py --out benchmarks/out/foundation.json

Writes one JSON object with every figure; benchmarks/RESULTS.md quotes it. Each RTN model
is compressed, saved (size = the saved directory), reloaded from disk and evaluated
against the reference on the built-in evaluation split (16,384 tokens, 512-token windows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RECIPES = ["rtn:bits=8,group=64", "rtn:bits=4,group=64", "rtn:bits=4,group=32", "rtn:bits=3,group=64",
           "rtn:bits=2,group=32"]


def timed_load_seconds(cold: bool) -> float:
    """Wall time of a fresh process that imports slimlm and loads the model (cold: empty cache)."""
    env = dict(os.environ)
    tmp = None
    if cold:
        tmp = tempfile.mkdtemp()
        env["SLIMLM_CACHE"] = tmp
    code = "import time; t=time.perf_counter(); import slimlm; slimlm.load('smollm2-135m'); print(time.perf_counter()-t)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return float(out.strip().splitlines()[-1])


def main():
    import copy

    import slimlm
    from slimlm.compress import compress_model
    from slimlm.eval.run import EvalConfig, evaluate
    from slimlm.eval.speed import bench_model
    from slimlm.formats.store import load_compressed, save_compressed

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/out/foundation.json")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--recipes", nargs="*", default=RECIPES)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--full-split", action="store_true", help="also the reference on the whole evaluation split")
    a = ap.parse_args()
    res = {"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    if not a.no_speed:
        res["load_cold_s"] = timed_load_seconds(cold=True)
        res["load_warm_s"] = timed_load_seconds(cold=False)
    ref = slimlm.load("smollm2-135m")
    cfg = EvalConfig(max_tokens=a.max_tokens)
    t0 = time.perf_counter()
    r = evaluate(ref, cfg, progress=False)
    res["reference"] = {k: r[k] for k in ("ppl", "tokens", "bpw", "size_bytes")}
    res["reference"]["eval_tps"] = r["tokens"] / (time.perf_counter() - t0)
    if a.full_split:
        full = evaluate(ref, EvalConfig(max_tokens=None), progress=False)
        res["reference_full_split"] = {"ppl": full["ppl"], "tokens": full["tokens"]}
    if not a.no_speed:
        res["reference"].update(bench_model(ref.model, ref.tokenizer, runs=3))
    res["rtn"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in a.recipes:
            lm = copy.copy(ref)
            lm.model = copy.deepcopy(ref.model)
            t0 = time.perf_counter()
            compress_model(lm, recipe, progress=False)
            secs = time.perf_counter() - t0
            path = Path(tmp) / recipe.replace(":", "_")
            save_compressed(lm, path)
            back = load_compressed(path)
            t0 = time.perf_counter()
            r = evaluate(back, cfg, reference=ref, path=path, progress=False)
            row = {"recipe": recipe, "compress_s": secs, "eval_s": time.perf_counter() - t0,
                   **{k: r[k] for k in ("ppl", "kl", "top1", "bpw", "size_bytes", "tokens")}}
            row["ratio"] = r["ppl"] / res["reference"]["ppl"]
            print(json.dumps(row), file=sys.stderr)
            res["rtn"].append(row)
            del lm, back
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
