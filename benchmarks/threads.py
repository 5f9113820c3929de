"""Decode under load: fixed 1 and 2 threads against the measured choice (runtime/threads.py).

    .venv/bin/python benchmarks/threads.py MODEL_DIR [--tokens 128] [--rounds 3] [--isa NAME]

For each load (quiet, then one competing busy process: a bounded Python busy loop that
ends by itself), the three thread settings run in turn, `--rounds` times, each a fresh
greedy decode of `--tokens` tokens after an 8-token prompt; tok/s medians are printed as
JSON. The auto setting re-measures every 256 steps, so one 128-token decode includes its
probe (4 steps per candidate and 4 of the choice): its cost is in the figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import slimlm
from slimlm.kernels import isa, set_isa
from slimlm.runtime.lean import LeanModel, RuntimeConfig, greedy
from slimlm.runtime.threads import set_threads


def decode(lean: LeanModel, ids: list[int], n: int) -> float:
    """tok/s of one greedy decode; a fixed count is set again, an auto model gets a fresh tuner (as a new process)."""
    if lean.runtime.threads:
        set_threads(lean.runtime.threads)
    else:
        lean._tuner = None
    lean.reset()
    tok = greedy(lean.prefill(ids))
    t0 = time.perf_counter()
    for _ in range(n):
        tok = greedy(lean.step(tok))
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--isa", default=None, help="int8 kernels to use (default: the best this CPU has)")
    a = p.parse_args()
    if a.isa:
        set_isa(a.isa)
    lm = slimlm.load(a.model)
    ids = lm.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"][:8]
    settings = {"1 thread": RuntimeConfig(threads=1), "2 threads": RuntimeConfig(threads=2), "auto": RuntimeConfig()}
    models = {k: LeanModel(lm.model, rt) for k, rt in settings.items()}
    out = {"model": a.model, "isa": isa(), "tokens": a.tokens, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for load in ("quiet", "one busy process"):
        hog = None
        if load != "quiet":
            hog = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 600\nwhile time.time() < t: pass"])
            time.sleep(0.5)
        try:
            res = {k: [] for k in settings}
            for _ in range(a.rounds):
                for name, lean in models.items():
                    res[name].append(decode(lean, ids, a.tokens))
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
        out[load] = {k: {"median_tps": round(statistics.median(v), 1), "runs": [round(x, 1) for x in v]}
                     for k, v in res.items()}
        print(load, json.dumps(out[load]), file=sys.stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
