"""Benchmark of the main job on the embedded model: a sweep, then `fit` at the size of
uniform 3-bit RTN, compared on KL with the best uniform 3-bit recipe of the sweep.

    .venv/bin/python benchmarks/sweep.py --out benchmarks/out/sweep [--recipes demo|all|R1,R2]

Prints wall and CPU seconds of each phase (CPU seconds of this process: on a shared
machine they bound what the phase costs alone better than wall time does) and writes
benchmarks/out/sweep/bench.json. Re-running resumes the sweep and reuses the cached
sensitivity table.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    from slimlm.commands.sweep import DEMO_CALIB_TOKENS, DEMO_FIT_BPW, DEMO_MAX_TOKENS, demo_fit_config
    from slimlm.compress import CalibrationConfig
    from slimlm.eval.run import EvalConfig
    from slimlm.fit.presets import default_presets, demo_presets
    from slimlm.fit.run import run_fit
    from slimlm.sweep import SweepConfig, format_table, run_sweep, with_ratios

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="benchmarks/out/sweep")
    p.add_argument("--recipes", default="demo", help="demo, all, or recipes separated by semicolons")
    p.add_argument("--max-tokens", type=int, default=DEMO_MAX_TOKENS)
    p.add_argument("--bpw", type=float, default=DEMO_FIT_BPW)
    p.add_argument("--methods", default="rtn", help="fit candidate methods, comma-separated")
    p.add_argument("--no-bench", action="store_true")
    p.add_argument("--skip-fit", action="store_true", help="only the sweep (run the fit in another process)")
    a = p.parse_args()
    recipes = {"demo": demo_presets, "all": default_presets}.get(a.recipes, lambda: a.recipes.split(";"))()
    ev = EvalConfig(max_tokens=a.max_tokens)
    cfg = SweepConfig(recipes=tuple(recipes), out_dir=a.out, eval=ev, bench=not a.no_bench,
                      calibration=CalibrationConfig.from_tokens(DEMO_CALIB_TOKENS))
    out = {"model": a.model, "recipes": recipes, "max_tokens": a.max_tokens, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    w0, c0 = time.perf_counter(), cpu_s()
    res = run_sweep(a.model, cfg)
    out["sweep"] = {"wall_s": time.perf_counter() - w0, "cpu_s": cpu_s() - c0, "computed": res.computed}
    print(format_table(res.rows))
    if a.skip_fit:
        print(json.dumps(out["sweep"]))
        return
    w0, c0 = time.perf_counter(), cpu_s()
    fcfg = demo_fit_config(a.bpw, ev, cfg.calibration, str(Path(a.out) / "fit"), tuple(a.methods.split(",")))
    fit = run_fit(a.model, fcfg)
    out["fit"] = {"wall_s": time.perf_counter() - w0, "cpu_s": cpu_s() - c0, "verdict": fit.verdict,
                  "recipe": fit.recipe, "row": fit.row, "attempts": len(fit.attempts)}
    rows = with_ratios(res.rows)
    uniform3 = [r for r in rows if "error" not in r and r["recipe"] != "none" and ":bits=3" in r["recipe"]
                and r["bpw"] <= fit.row["bpw"] + 0.05 and "+" not in r["recipe"]]
    if uniform3:
        best = min(uniform3, key=lambda r: r["kl"])
        out["best_uniform3"] = {"recipe": best["recipe"], "kl": best["kl"], "bpw": best["bpw"], "ratio": best["ratio"]}
        out["kl_reduction"] = 1 - fit.row["kl"] / best["kl"]
    print(json.dumps({k: v for k, v in out.items() if k != "recipes"}, indent=1, default=str))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "bench.json").write_text(json.dumps(out, indent=1, default=str))
    from slimlm.report import write_report

    print("report:", write_report(a.out))


if __name__ == "__main__":
    main()
