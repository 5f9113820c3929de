"""`slimlm sweep` and `slimlm demo`: many recipes, each evaluated and benchmarked, one table and report."""

from __future__ import annotations

import sys
import time

from slimlm.cli import SOURCE_HELP, add_calib_flags, add_eval_flags, calib_config, eval_config, print_json

DEMO_MAX_TOKENS = 4096  # evaluation tokens per model in the demo (8 windows of 512)
DEMO_CALIB_TOKENS = 4096  # calibration tokens for methods that need them in the demo
DEMO_SWEEP_BUDGET_S = 480  # the demo starts no new sweep recipe after 8 minutes (the fit follows)
DEMO_FIT_BPW = 3.5  # the demo's fit budget: the bits per weight of uniform RTN 3-bit, groups of 64


def demo_fit_config(bpw, eval_cfg, calibration, out_dir, methods=("rtn",)):
    """The demo's fit: RTN candidates, statistics on 4 windows of 256 tokens, gains on the first."""
    from slimlm.fit.budget import Budget
    from slimlm.fit.run import FitConfig
    from slimlm.fit.sensitivity import SensitivityConfig

    return FitConfig(budget=Budget(max_bpw=bpw), methods=tuple(methods), eval=eval_cfg, calibration=calibration,
                     sensitivity=SensitivityConfig(n_windows=4, seq_len=256, kl_windows=1), out_dir=out_dir)


def read_recipes_file(path: str) -> list[str]:
    """Recipes from a file: a JSON/YAML list (of one-line strings or recipe objects), or one per line."""
    import json
    from pathlib import Path

    from slimlm.compress import Recipe
    from slimlm.errors import SlimlmError

    p = Path(path)
    if not p.is_file():
        raise SlimlmError(f"recipes file {path}: no such file")
    text = p.read_text()
    if p.suffix.lower() in (".json", ".yaml", ".yml"):
        import yaml

        try:
            data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
        except Exception as e:
            raise SlimlmError(f"recipes file {path} could not be parsed: {e}") from None
        if not isinstance(data, list):
            raise SlimlmError(f"recipes file {path} must hold a list of recipes")
        return [r if isinstance(r, str) else Recipe.from_dict(r).to_string() for r in data]
    lines = (ln.split("#", 1)[0].strip() for ln in text.splitlines())
    return [ln for ln in lines if ln]


def _sweep_config(a, recipes):
    from slimlm.sweep import SweepConfig

    return SweepConfig(recipes=tuple(recipes), out_dir=a.out, eval=eval_config(a), calibration=calib_config(a),
                       bench=not a.no_bench, keep_models=a.keep_models, time_budget_s=a.time_budget,
                       ray_address=a.ray, seed=a.seed)


def _print(a, result) -> None:
    from slimlm.report import write_report
    from slimlm.sweep import format_table, with_ratios

    page = write_report(a.out)
    if a.json:
        print_json({"rows": with_ratios(result.rows), "skipped": result.skipped, "report": str(page)})
        return
    print(format_table(result.rows))
    if result.skipped:
        print(f"\nnot run within the time budget ({len(result.skipped)}): {', '.join(result.skipped)}; "
              "run the same command again to continue", file=sys.stderr)
    print(f"\n{result.computed} recipe(s) computed, {len(result.rows) - result.computed} from {a.out}/results; "
          f"report: {page}", file=sys.stderr)


def cmd_sweep(a) -> int:
    from slimlm.sweep import run_sweep

    recipes = list(a.recipe or [])
    if a.recipes:
        recipes += read_recipes_file(a.recipes)
    result = run_sweep(a.model, _sweep_config(a, recipes), progress=not a.quiet)
    _print(a, result)
    return 0


def cmd_demo(a) -> int:
    from pathlib import Path

    from slimlm.fit.presets import demo_presets
    from slimlm.fit.run import run_fit
    from slimlm.sweep import format_table, run_sweep

    model = "smollm2-135m"
    recipes = demo_presets()
    print(f"slimlm demo: the embedded SmolLM2-135M, {len(recipes)} recipes (every registered method), each evaluated "
          f"against the reference on {a.max_tokens} tokens of the built-in evaluation split, then `fit` to "
          f"{DEMO_FIT_BPW} bits per weight (the size of uniform 3-bit RTN, groups of 64). Re-running resumes.",
          file=sys.stderr)
    # RTN first, and its table at once: the foundation's figures, a few minutes in. The
    # rest of the sweep resumes from the same store, so these rows are not computed twice.
    rtn = [r for r in recipes if r.startswith("rtn:")]
    t0 = time.perf_counter()
    first = run_sweep(model, _sweep_config(a, rtn), progress=not a.quiet)
    if not a.json:
        print("RTN on the embedded model (more methods follow):")
        print(format_table(first.rows), flush=True)
    if a.time_budget is not None:
        a.time_budget = max(1.0, a.time_budget - (time.perf_counter() - t0))
    result = run_sweep(model, _sweep_config(a, recipes), progress=not a.quiet)
    fit_cfg = demo_fit_config(DEMO_FIT_BPW, eval_config(a), calib_config(a), str(Path(a.out) / "fit"))
    fit = run_fit(model, fit_cfg, progress=not a.quiet)
    print(f"fit to {DEMO_FIT_BPW} bpw: {fit.verdict}", file=sys.stderr)
    _print(a, result)
    return 0


def register(subparsers) -> None:
    for name, fn, hlp in (("sweep", cmd_sweep, "compress with many recipes, evaluate and benchmark each: table and report"),
                          ("demo", cmd_demo, "a sweep of every method plus a fit on the embedded model (`make demo`)")):
        s = subparsers.add_parser(name, help=hlp)
        if name == "sweep":
            s.add_argument("model", help=SOURCE_HELP)
            s.add_argument("--recipe", action="append", help="a recipe to include (repeatable)")
            s.add_argument("--recipes", metavar="FILE",
                           help="recipes file: one per line, or a JSON/YAML list (default: every method's presets)")
        s.add_argument("--out", default=f"out/{name}", help="where results, the report (and kept models) go; "
                       "re-running with the same --out resumes")
        s.add_argument("--no-bench", action="store_true", help="skip the decode-speed measurement")
        s.add_argument("--keep-models", action="store_true", help="keep every compressed model under OUT/models")
        s.add_argument("--time-budget", type=float, default=DEMO_SWEEP_BUDGET_S if name == "demo" else None,
                       metavar="SECONDS", help="start no new recipe after this many seconds (resume later)")
        s.add_argument("--ray", metavar="ADDRESS", help="run recipes as tasks on this Ray cluster (e.g. auto or host:6379)")
        add_eval_flags(s)
        add_calib_flags(s)
        if name == "demo":
            s.set_defaults(max_tokens=DEMO_MAX_TOKENS, calib_tokens=DEMO_CALIB_TOKENS)
        s.set_defaults(fn=fn)
