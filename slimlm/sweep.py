"""Compress one model with many recipes, evaluate and benchmark each, tabulate — resumably.

    for each recipe (the reference, "none", first):
        key  = hash(model fingerprint, recipe, evaluation data, calibration data when the
               recipe uses it, bench settings, slimlm version)
        out_dir/results/<key>.json exists?  -> reuse it (a finished sweep re-renders at once)
        else compress a copy of the model, save it (its size is the real directory size),
             evaluate against the reference, benchmark decode, store the row atomically

An interrupted sweep therefore continues where it stopped. Recipes run in-process by
default, or as Ray tasks on a cluster (`ray_address`); each task loads the model itself,
so the source must be readable on every node (a builtin name or a shared path). The
rows of the last sweep are also written to out_dir/sweep.json for `slimlm report`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

import slimlm
from slimlm.compress import CalibrationConfig, Recipe, compress_model
from slimlm.errors import SlimlmError
from slimlm.eval.run import EvalConfig, evaluate
from slimlm.eval.speed import bench_model
from slimlm.formats.store import save_compressed
from slimlm.loading import load

REFERENCE = "none"  # the uncompressed model is the sweep's first row


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep runs and how; `recipes` empty means the default presets."""

    recipes: tuple[str, ...] = ()
    out_dir: str = "out/sweep"
    eval: EvalConfig = EvalConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    bench: bool = True
    bench_prompt_tokens: int = 64
    bench_decode_tokens: int = 32
    bench_runs: int = 2
    keep_models: bool = False  # keep each compressed model directory under out_dir/models
    time_budget_s: float | None = None  # start no new recipe after this many seconds (in-process only;
    # the reference row always runs)
    ray_address: str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise SlimlmError(f"the sweep's time budget must be positive, got {self.time_budget_s}")
        if self.bench_runs < 1 or self.bench_decode_tokens < 1:
            raise SlimlmError("benchmark runs and decode tokens must be at least 1")


@dataclass
class SweepResult:
    rows: list[dict]  # the reference first, then one per recipe, in recipe order
    computed: int = 0  # rows computed in this call (the others came from the store)
    skipped: list[str] = field(default_factory=list)  # recipes not started (time budget)
    crashed: list[str] = field(default_factory=list)  # recipes that raised an unexpected error (not stored)


# ---- keys: what a stored row depends on --------------------------------------------------------


def _file_digest(path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else str(path)


def model_fingerprint(source: str) -> str:
    """A builtin name as is; a file or directory by its files' names, sizes and mtimes."""
    p = Path(source)
    if not p.exists():
        return source
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256(str(p.resolve()).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def recipe_key(fingerprint: str, recipe: Recipe, cfg: SweepConfig) -> str:
    """The store key of one recipe's row (16 hex digits)."""
    ev = asdict(cfg.eval)
    ev["text_digest"] = _file_digest(cfg.eval.text_file)
    ev["task_digests"] = [_file_digest(t) for t in cfg.eval.tasks]
    calib = None
    if recipe.needs():
        calib = asdict(cfg.calibration) | {"text_digest": _file_digest(cfg.calibration.text_file)}
    bench = (cfg.bench_prompt_tokens, cfg.bench_decode_tokens, cfg.bench_runs) if cfg.bench else None
    data = dict(model=fingerprint, recipe=recipe.to_string(), eval=ev, calibration=calib, bench=bench,
                seed=cfg.seed, version=slimlm.__version__)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Store:
    """One JSON file per row under `root/results`, written atomically."""

    def __init__(self, root: str | Path):
        self.dir = Path(root) / "results"

    def get(self, key: str) -> dict | None:
        p = self.dir / f"{key}.json"
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return None  # a damaged row is recomputed

    def put(self, key: str, row: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.dir / f"{key}.json", row)


def write_json_atomic(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


# ---- one recipe -------------------------------------------------------------------------------------


def run_recipe(reference, recipe: str, cfg: SweepConfig, key: str) -> dict:
    """Compress a copy of `reference` (a LoadedModel) with `recipe`, save, evaluate, bench: one row.

    A recipe the model refuses (SlimlmError) gives a row with `error` set, stored like any
    other, so a re-run does not retry it."""
    rec = Recipe.parse(recipe)
    row = {"recipe": rec.to_string(), "key": key, "methods": [s.method for s in rec.stages]}
    try:
        if not rec.stages:
            r = evaluate(reference, cfg.eval, reference=None, progress=False)
            lm, secs, r["kl"], r["top1"] = reference, 0.0, 0.0, 1.0
        else:
            lm = copy.copy(reference)
            lm.model = copy.deepcopy(reference.model)
            t0 = time.perf_counter()
            compress_model(lm, rec, cfg.calibration, progress=False, seed=cfg.seed)
            secs = time.perf_counter() - t0
            path = Path(cfg.out_dir) / "models" / key
            save_compressed(lm, path, overwrite=True)
            r = evaluate(lm, cfg.eval, reference=reference, path=path, progress=False)
            if not cfg.keep_models:
                shutil.rmtree(path, ignore_errors=True)
            else:
                row["path"] = str(path)
    except SlimlmError as e:
        return row | {"error": str(e)}
    row.update({k: r[k] for k in ("bpw", "size_bytes", "ppl", "kl", "top1", "tokens")}, compress_s=secs)
    for name, t in r.get("tasks", {}).items():
        row[f"task:{name}"] = t["acc_norm"]
    if cfg.bench:
        b = bench_model(lm.model, lm.tokenizer, cfg.bench_prompt_tokens, cfg.bench_decode_tokens, cfg.bench_runs)
        row.update(decode_tps=b["decode_tps"], prefill_tps=b["prefill_tps"], threads=b["threads"])
    return row


def _ray_task(source: str, recipe: str, cfg: SweepConfig, key: str) -> dict:
    return run_recipe(load(source), recipe, cfg, key)


# ---- the sweep ---------------------------------------------------------------------------------------


def resolve_recipes(cfg: SweepConfig) -> list[Recipe]:
    """The reference plus the configured (or default) recipes, parsed, duplicates dropped."""
    from slimlm.fit.presets import default_presets

    names = list(cfg.recipes) if cfg.recipes else default_presets()
    out, seen = [Recipe.parse(REFERENCE)], {REFERENCE}
    for r in names:
        rec = Recipe.load(r)  # every recipe parsed before any work
        if rec.to_string() not in seen:
            seen.add(rec.to_string())
            out.append(rec)
    return out


def run_sweep(source: str, cfg: SweepConfig = SweepConfig(), progress: bool = True) -> SweepResult:
    """Run (or resume) a sweep of `source`; returns every row, the reference first."""
    recipes = resolve_recipes(cfg)
    fingerprint = model_fingerprint(source)
    store = Store(cfg.out_dir)
    keys = [recipe_key(fingerprint, r, cfg) for r in recipes]
    rows: dict[str, dict] = {k: row for k in keys if (row := store.get(k)) is not None}
    todo = [(k, r.to_string()) for k, r in zip(keys, recipes) if k not in rows]
    bar = tqdm(total=len(keys), initial=len(keys) - len(todo), desc="sweep", unit="recipe", disable=not progress)
    result = SweepResult(rows=[])
    if todo and cfg.ray_address:
        _run_ray(source, todo, cfg, store, rows, bar)
    elif todo:
        t0 = time.perf_counter()
        reference = load(source)
        for i, (key, recipe) in enumerate(todo):
            over = cfg.time_budget_s is not None and time.perf_counter() - t0 > cfg.time_budget_s
            if over and recipe != REFERENCE:  # the reference always runs: every ratio needs it
                result.skipped = [r for _, r in todo[i:]]
                break
            bar.set_postfix_str(recipe[:40])
            try:
                rows[key] = run_recipe(reference, recipe, cfg, key)
                store.put(key, rows[key])
            except Exception as e:  # a bug in one method must not end the sweep: shown, not stored, retried next time
                rows[key] = {"recipe": recipe, "key": key, "error": f"crashed ({type(e).__name__}: {e})"}
                result.crashed.append(recipe)
            bar.update(1)
    bar.close()
    result.computed = sum(1 for k, r in todo if k in rows and r not in result.crashed)
    result.rows = [rows[k] for k in keys if k in rows]
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(cfg.out_dir) / "sweep.json", {"model": source, "rows": result.rows,
                                                         "skipped": result.skipped, "eval": asdict(cfg.eval)})
    return result


def _run_ray(source, todo, cfg, store, rows, bar) -> None:
    try:
        import ray
    except ImportError:
        raise SlimlmError("--ray needs the ray package; install it with `pip install ray` or drop --ray") from None
    if not ray.is_initialized():
        try:
            ray.init(address=cfg.ray_address, log_to_driver=False)
        except Exception as e:  # ray raises ConnectionError and others
            raise SlimlmError(f"could not connect to the Ray cluster at {cfg.ray_address}: {e}") from None
    task = ray.remote(num_cpus=1)(_ray_task)
    remote_cfg = replace(cfg, ray_address=None)
    pending = {task.remote(source, recipe, remote_cfg, key): key for key, recipe in todo}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        key = pending.pop(done[0])
        rows[key] = ray.get(done[0])
        store.put(key, rows[key])
        bar.update(1)


# ---- the table ------------------------------------------------------------------------------------------


def with_ratios(rows: list[dict]) -> list[dict]:
    """Rows with `ratio` = perplexity ÷ the reference's (the row whose recipe is "none")."""
    ref = next((r for r in rows if r["recipe"] == REFERENCE and "ppl" in r), None)
    return [r | {"ratio": r["ppl"] / ref["ppl"]} if ref and "ppl" in r else dict(r) for r in rows]


def format_table(rows: list[dict]) -> str:
    from slimlm.report.pareto import frontier_flags

    rows = with_ratios(rows)
    front = frontier_flags(rows, "bpw", "ratio")
    head = ["recipe", "bpw", "size MB", "ppl", "ratio", "KL", "top-1", "decode tok/s", "compress s", "front"]
    lines = [head]
    for r, on in zip(rows, front):
        if "error" in r:
            lines.append([r["recipe"], f"failed: {r['error']}"] + [""] * (len(head) - 2))
            continue
        lines.append([
            r["recipe"], f"{r['bpw']:.3f}", f"{r['size_bytes'] / 1e6:.1f}", f"{r['ppl']:.3f}",
            f"{r['ratio']:.3f}" if "ratio" in r else "-", f"{r['kl']:.4f}", f"{r['top1']:.3f}",
            f"{r['decode_tps']:.1f}" if "decode_tps" in r else "-", f"{r['compress_s']:.1f}", "*" if on else "",
        ])
    widths = [max(len(row[i]) for row in lines if len(row) == len(head) and not row[1].startswith("failed"))
              for i in range(len(head))]

    def fmt(row):
        if row[1].startswith("failed"):
            return f"{row[0].ljust(widths[0])}  {row[1]}"
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(lines[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines[1:]])
