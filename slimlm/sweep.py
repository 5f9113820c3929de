"""Compress one model with several recipes, evaluate each against the reference, tabulate.

This is what `make demo` runs (the default list is a set of RTN recipes). Each
compressed model is saved under `out_dir`, so its size is the real directory size and
it can be reused (`slimlm eval`, `slimlm generate`).
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from slimlm.compress import CalibrationConfig, Recipe, compress_model
from slimlm.eval.run import EvalConfig, evaluate
from slimlm.eval.speed import bench_model
from slimlm.formats.store import save_compressed
from slimlm.loading import load

DEMO_RECIPES = (
    "rtn:bits=8,group=64",
    "rtn:bits=4,group=32",  # on the embedded model: exact, its weights sit on a Q4_1 grid of blocks of 32
    "rtn:bits=4,group=64",
    "rtn:bits=4,group=128",  # 128 does not divide 576: a shorter last group
    "rtn:bits=3,group=64",
    "rtn:bits=2,group=32",
)


@dataclass(frozen=True)
class SweepConfig:
    recipes: tuple[str, ...] = DEMO_RECIPES
    out_dir: str = "out/sweep"
    eval: EvalConfig = EvalConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    bench: bool = True


def slug(recipe: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", recipe)[:120]


def run_sweep(source: str, cfg: SweepConfig = SweepConfig(), progress: bool = True) -> list[dict]:
    recipes = [Recipe.load(r) for r in cfg.recipes]  # every recipe parsed before any work
    reference = load(source)
    rows = []
    ref = evaluate(reference, cfg.eval, reference=None, progress=False)
    ref_row = {"recipe": "reference", "bpw": ref["bpw"], "size_bytes": ref["size_bytes"], "ppl": ref["ppl"],
               "ratio": 1.0, "kl": 0.0, "top1": 1.0, "tokens": ref["tokens"], "compress_s": 0.0}
    if cfg.bench:
        ref_row["decode_tps"] = bench_model(reference.model, reference.tokenizer, runs=2)["decode_tps"]
    rows.append(ref_row)
    for recipe in tqdm(recipes, desc="sweep", unit="recipe", disable=not progress):
        lm = copy.copy(reference)
        lm.model = copy.deepcopy(reference.model)
        t0 = time.perf_counter()
        compress_model(lm, recipe, cfg.calibration, progress=False)
        secs = time.perf_counter() - t0
        path = Path(cfg.out_dir) / slug(recipe.to_string())
        save_compressed(lm, path, overwrite=True)
        r = evaluate(lm, cfg.eval, reference=reference, path=path, progress=False)
        row = {"recipe": recipe.to_string(), "bpw": r["bpw"], "size_bytes": r["size_bytes"], "ppl": r["ppl"],
               "ratio": r["ppl"] / ref["ppl"], "kl": r["kl"], "top1": r["top1"], "tokens": r["tokens"],
               "compress_s": secs, "path": str(path)}
        if cfg.bench:
            row["decode_tps"] = bench_model(lm.model, lm.tokenizer, runs=2)["decode_tps"]
        rows.append(row)
        del lm
    return rows


def format_table(rows: list[dict]) -> str:
    head = ["recipe", "bpw", "size MB", "ppl", "ratio", "KL", "top-1", "decode tok/s", "compress s"]
    lines = [head]
    for r in rows:
        lines.append([
            r["recipe"], f"{r['bpw']:.3f}", f"{r['size_bytes'] / 1e6:.1f}", f"{r['ppl']:.3f}", f"{r['ratio']:.3f}",
            f"{r['kl']:.4f}", f"{r['top1']:.3f}", f"{r['decode_tps']:.1f}" if "decode_tps" in r else "-",
            f"{r['compress_s']:.1f}",
        ])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt(lines[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines[1:]])
