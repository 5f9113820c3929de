"""`slimlm fit MODEL --max-size 60MB`: the least-loss mix of formats that meets a budget."""

from __future__ import annotations

import argparse
import sys

from slimlm.cli import SOURCE_HELP, add_calib_flags, add_eval_flags, calib_config, eval_config, print_json


def cmd_fit(a) -> int:
    from slimlm.commands.sweep import read_recipes_file
    from slimlm.fit.budget import Budget, parse_fraction, parse_size
    from slimlm.fit.run import FitConfig, run_fit
    from slimlm.fit.sensitivity import SensitivityConfig

    budget = Budget(max_size_bytes=parse_size(a.max_size) if a.max_size else None, max_bpw=a.max_bpw,
                    min_decode_tps=a.min_decode_tps,
                    max_ppl_increase=parse_fraction(a.max_ppl_increase) if a.max_ppl_increase else None)
    cands = list(a.candidate or [])
    if a.candidates:
        cands += read_recipes_file(a.candidates)
    sens = SensitivityConfig(text_file=a.calib_text, n_windows=a.sens_windows, seq_len=a.calib_seq_len,
                             kl_windows=min(a.kl_windows, a.sens_windows), seed=a.seed, probe=a.probe)
    cfg = FitConfig(budget=budget, candidates=tuple(cands), methods=tuple(a.methods.split(",")) if a.methods else (),
                    sensitivity=sens, eval=eval_config(a), calibration=calib_config(a), out_dir=a.out,
                    attempts=a.attempts, seed=a.seed, head=a.head)
    res = run_fit(a.model, cfg, progress=not a.quiet)
    if a.json:
        print_json({"met": res.met, "verdict": res.verdict, "recipe": res.recipe, "row": res.row,
                    "attempts": res.attempts})
    else:
        r = res.row
        print(f"{res.verdict}\nrecipe ({a.out}/recipe.yaml): {res.recipe}")
        print(f"measured: {r['bpw']:.3f} bpw, {r['size_bytes'] / 1e6:.2f} MB, perplexity {r['ppl']:.3f} "
              f"(×{r['ratio']:.4f}), KL {r['kl']:.4f}, top-1 {r['top1']:.3f}; model saved in {r['path']}")
    if not res.met:
        print("slimlm: the budget was not met (see above)", file=sys.stderr)
    return 0 if res.met else 2


def register(subparsers) -> None:
    s = subparsers.add_parser("fit", help="choose a per-layer mix of formats that meets a budget, compress, measure")
    s.add_argument("model", help=SOURCE_HELP)
    s.add_argument("--max-size", metavar="SIZE", help="saved size limit, e.g. 60MB or 512MiB")
    s.add_argument("--max-bpw", type=float, help="bits per weight limit over the block linears")
    s.add_argument("--min-decode-tps", type=float, help="decode tokens/s the result must reach (measured)")
    s.add_argument("--max-ppl-increase", metavar="FRACTION", help="perplexity increase limit, e.g. 2%% or 0.02")
    s.add_argument("--methods", help="comma-separated quantize methods to draw candidates from (default: all)")
    s.add_argument("--candidate", action="append", help="a one-stage candidate recipe (repeatable; replaces the default)")
    s.add_argument("--candidates", metavar="FILE", help="candidate recipes file (one per line or a JSON/YAML list)")
    s.add_argument("--probe", default="rtn:bits=3,group=64", help="the candidate whose end-to-end KL sets each layer's gain")
    s.add_argument("--sens-windows", type=int, default=4, help="calibration windows for the sensitivity statistics")
    s.add_argument("--kl-windows", type=int, default=1, help="of those, windows used to measure each layer's KL gain")
    s.add_argument("--head", action=argparse.BooleanOptionalAction, default=None,
                   help="let fit compress the output head (and a tied input embedding); default: on with --max-size, "
                   "off otherwise; with it, --max-bpw counts the head too")
    s.add_argument("--attempts", type=int, default=3, help="re-solve this many times when a measurement misses a limit")
    s.add_argument("--out", default="out/fit", help="where the recipe, fit.json, the model and the cache go")
    add_eval_flags(s)
    add_calib_flags(s)
    s.set_defaults(fn=cmd_fit)
