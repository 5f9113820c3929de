"""`slimlm sweep` and `slimlm demo`: several recipes, each evaluated and benchmarked, one table."""

from __future__ import annotations

import sys

from slimlm.cli import SOURCE_HELP, add_calib_flags, add_eval_flags, calib_config, eval_config, print_json


def cmd_sweep(a) -> int:
    from slimlm.sweep import DEMO_RECIPES, SweepConfig, format_table, run_sweep

    recipes = tuple(a.recipe) if a.recipe else DEMO_RECIPES
    cfg = SweepConfig(recipes=recipes, out_dir=a.out, eval=eval_config(a), calibration=calib_config(a), bench=not a.no_bench)
    rows = run_sweep(a.model, cfg, progress=not a.quiet)
    if a.json:
        print_json(rows)
    else:
        print(format_table(rows))
    return 0


def cmd_demo(a) -> int:
    a.recipe = None
    a.model = "smollm2-135m"
    print("slimlm demo: the embedded SmolLM2-135M with several RTN recipes, each evaluated against the "
          "reference on the built-in evaluation split. Note: 4-bit groups of 32 reproduce this model exactly "
          "(its weights lie on a Q4_1 grid of blocks of 32), so that row flatters RTN.", file=sys.stderr)
    return cmd_sweep(a)


def register(subparsers) -> None:
    for name, fn, hlp in (("sweep", cmd_sweep, "compress with several recipes, evaluate and benchmark each, print a table"),
                          ("demo", cmd_demo, "the sweep of RTN recipes on the embedded model (what `make demo` runs)")):
        s = subparsers.add_parser(name, help=hlp)
        if name == "sweep":
            s.add_argument("model", help=SOURCE_HELP)
            s.add_argument("--recipe", action="append", help="a recipe to include (repeatable; default: the demo list)")
        s.add_argument("--out", default=f"out/{name}", help="where the compressed models are saved")
        s.add_argument("--no-bench", action="store_true", help="skip the decode-speed measurement")
        add_eval_flags(s)
        add_calib_flags(s)
        s.set_defaults(fn=fn)

