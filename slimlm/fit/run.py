"""`fit`: the least-loss per-layer mix of formats that meets a budget, compressed and measured.

    1. sensitivity   each layer × candidate: stored bits and predicted KL (cached)
    2. solve         knapsack over the layers (slimlm.fit.solve) within the bit budget the
                     size / bpw limits leave, or the least bits within a loss budget
                     (predicted KL summed over layers ≈ increase of the log perplexity)
    3. compress      with the chosen mix written as a recipe (the sequential engine)
    4. measure       evaluate against the reference (and bench when a speed limit is set)
    5. check         every limit against the measurement; when one is broken, tighten the
                     bit or loss budget by what was missed and go back to 2 (a few times)

The result is respected or refused with a sentence saying which limit and by how much;
the recipe (YAML and one line), the compressed model and fit.json land in `out_dir`.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from slimlm.compress import CalibrationConfig, Recipe, compress_model
from slimlm.errors import SlimlmError
from slimlm.eval.run import EvalConfig, evaluate
from slimlm.eval.size import model_bytes
from slimlm.fit.budget import Budget
from slimlm.fit.presets import fit_candidates
from slimlm.fit.sensitivity import SensitivityConfig, measure
from slimlm.fit.solve import build_plan, recipe_from_choice
from slimlm.formats.store import save_compressed
from slimlm.loading import load
from slimlm.sweep import write_json_atomic

MANIFEST_BYTES_PER_LAYER = 600  # slimlm.json grows by about this much per compressed layer


@dataclass(frozen=True)
class FitConfig:
    budget: Budget
    candidates: tuple[str, ...] = ()  # one-stage quantize recipes; empty: fit_candidates(methods)
    methods: tuple[str, ...] = ()  # restrict the default candidates to these methods
    sensitivity: SensitivityConfig = SensitivityConfig()
    eval: EvalConfig = EvalConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    out_dir: str = "out/fit"
    attempts: int = 3
    bench_decode_tokens: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.attempts < 1:
            raise SlimlmError(f"fit needs at least one attempt, got {self.attempts}")


@dataclass
class FitResult:
    recipe: str
    row: dict  # the measured result, as a sweep row
    met: bool
    verdict: str
    attempts: list[dict] = field(default_factory=list)


def fixed_bytes(lm) -> int:
    """Bytes the saved directory holds besides the packed block linears: every other
    tensor, the tokenizer and config files, the manifest (estimated per layer)."""
    import tempfile

    from slimlm.eval.size import dir_bytes

    linear = sum(lm.model.get_submodule(n).weight.numel() * lm.model.get_submodule(n).weight.element_size()
                 for n in lm.adapter.linear_names(lm.model))
    with tempfile.TemporaryDirectory() as d:
        lm.tokenizer.save_pretrained(d)
        aux = dir_bytes(d)
    return model_bytes(lm) - linear + aux + 4096 + MANIFEST_BYTES_PER_LAYER * len(lm.adapter.linear_names(lm.model))


def run_fit(source: str, cfg: FitConfig, progress: bool = True) -> FitResult:
    """Fit `source` to `cfg.budget`; see the module docstring."""
    budget = cfg.budget
    out = Path(cfg.out_dir)
    cands = list(cfg.candidates) or fit_candidates(cfg.methods or None)
    reference = load(source)
    table = measure(reference, cands, cfg.sensitivity, cache_dir=out / "cache", progress=progress)
    layers = table.layers
    names = list(dict.fromkeys(Recipe.parse(c).to_string() for c in cands))
    cost = np.array([[table.predicted_kl(n, c) if c in table.err[n] else np.inf for c in names] for n in layers])
    bits = np.array([[table.bits[n].get(c, 0) for c in names] for n in layers], dtype=np.int64)
    plan = build_plan(layers, names, cost, bits)
    numel = sum(table.numel.values())

    fixed = fixed_bytes(reference)
    max_bits = _bit_budget(budget, fixed, numel, plan, names)
    max_cost = math.log1p(budget.max_ppl_increase) if budget.max_ppl_increase is not None else None
    ref = evaluate(reference, cfg.eval, reference=None, progress=False)
    attempts = []
    row, recipe, why_not = None, None, ""
    for attempt in range(cfg.attempts):
        choice = plan.choose(max_bits, max_cost)
        if choice is None:
            raise SlimlmError(_infeasible(budget, max_bits, max_cost, plan, numel))
        recipe = recipe_from_choice(choice, layers, reference.adapter.blocks_path)
        predicted = float(sum(cost[i, names.index(choice[n])] for i, n in enumerate(layers)))
        row = _compress_and_measure(reference, recipe, cfg, out / "model", budget, progress)
        row["predicted_kl"] = predicted
        row["ratio"] = row["ppl"] / ref["ppl"]
        broken = budget.violations(row, ref["ppl"])
        attempts.append({"recipe": recipe.to_string(), "max_bits": max_bits, "max_cost": max_cost,
                         "bpw": row["bpw"], "size_bytes": row["size_bytes"], "ppl": row["ppl"], "kl": row["kl"],
                         "predicted_kl": predicted, "broken": broken})
        if not broken:
            break
        max_bits, max_cost, why_not = _tighten(budget, row, ref["ppl"], max_bits, max_cost, numel)
        if why_not:
            break
    broken = attempts[-1]["broken"]
    if broken:
        verdict = (f"Budget not met after {len(attempts)} attempt(s): " + "; ".join(broken) + "."
                   + (f" {why_not}" if why_not else ""))
    else:
        verdict = (f"Budget met: {row['bpw']:.3f} bpw, {row['size_bytes'] / 1e6:.2f} MB, perplexity ×{row['ratio']:.4f}, "
                   f"KL {row['kl']:.4f} (predicted {row['predicted_kl']:.4f}).")
    result = FitResult(recipe=recipe.to_string(), row=row, met=not broken, verdict=verdict, attempts=attempts)
    _write(out, result, recipe, budget, cfg, source, ref)
    return result


def _bit_budget(budget: Budget, fixed: int, numel: int, plan, names) -> int | None:
    """Stored bits the size and bpw limits leave for the block linears (None: no limit)."""
    limits = []
    if budget.max_bpw is not None:
        limits.append(int(budget.max_bpw * numel))
    if budget.max_size_bytes is not None:
        room = budget.max_size_bytes - fixed
        if room * 8 < plan.min_bits():
            smallest = min(names, key=lambda c: plan.bits[:, names.index(c)].sum())
            raise SlimlmError(
                f"the size budget of {budget.max_size_bytes / 1e6:.2f} MB cannot be met: the parts no recipe compresses "
                f"(embeddings, norms, tokenizer, manifest) take {fixed / 1e6:.2f} MB, leaving "
                f"{max(room, 0) / 1e6:.2f} MB for the block linears, which need at least {plan.min_bits() / 8e6:.2f} MB "
                f"with the smallest candidates (e.g. {smallest}); raise --max-size or add smaller candidates")
        limits.append(room * 8)
    return min(limits) if limits else None


def _infeasible(budget: Budget, max_bits, max_cost, plan, numel: int) -> str:
    if max_bits is not None and max_bits < plan.min_bits():
        return (f"the budget ({budget.describe()}) leaves {max_bits / numel:.3f} bits per weight for the block "
                f"linears but the smallest candidates need {plan.min_bits() / numel:.3f}; "
                "relax the budget or add smaller candidates")
    best = plan.f[-1] if max_bits is None else plan.f[min(len(plan.f) - 1, max_bits // plan.unit)]
    return (f"no mix of the candidates meets {budget.describe()}: the least predicted loss within the size limit is "
            f"a KL of {best:.4f} nats, above the {max_cost:.4f} the perplexity limit allows; relax a limit or add "
            "more precise candidates")


def _tighten(budget: Budget, row, ref_ppl, max_bits, max_cost, numel):
    """New (max_bits, max_cost) after a measured miss, or a reason no retry can help."""
    if budget.min_decode_tps is not None and row.get("decode_tps", 0.0) < budget.min_decode_tps:
        return max_bits, max_cost, ("Decode speed does not depend on the chosen formats in this runtime (it computes "
                                    "from dequantized weights), so no mix of formats can reach it.")
    if budget.max_size_bytes is not None and row["size_bytes"] > budget.max_size_bytes:
        over = (row["size_bytes"] - budget.max_size_bytes) * 8
        max_bits = row["linear_bits"] - over - 8 * 1024  # the measured overshoot plus a margin
    if budget.max_bpw is not None and row["bpw"] > budget.max_bpw:
        max_bits = min(max_bits, int(budget.max_bpw * numel) - (row["linear_bits"] - int(budget.max_bpw * numel)))
    if budget.max_ppl_increase is not None and row["ppl"] > ref_ppl * (1 + budget.max_ppl_increase):
        actual = math.log(row["ppl"] / ref_ppl)  # the measured increase of log perplexity
        max_cost = max_cost * math.log1p(budget.max_ppl_increase) / actual * 0.9
    return max_bits, max_cost, ""


def _compress_and_measure(reference, recipe, cfg: FitConfig, path: Path, budget: Budget, progress: bool) -> dict:
    from slimlm.eval.speed import bench_model

    lm = copy.copy(reference)
    lm.model = copy.deepcopy(reference.model)
    t0 = time.perf_counter()
    compress_model(lm, recipe, cfg.calibration, progress=progress, seed=cfg.seed)
    secs = time.perf_counter() - t0
    save_compressed(lm, path, overwrite=True)
    r = evaluate(lm, cfg.eval, reference=reference, path=path, progress=False)
    row = {"recipe": recipe.to_string(), "methods": sorted({s.method for s in recipe.stages}), "compress_s": secs,
           "path": str(path), **{k: r[k] for k in ("bpw", "size_bytes", "linear_bits", "ppl", "kl", "top1", "tokens")}}
    if budget.min_decode_tps is not None:
        b = bench_model(lm.model, lm.tokenizer, 64, cfg.bench_decode_tokens, 2)
        row.update(decode_tps=b["decode_tps"], prefill_tps=b["prefill_tps"])
    return row


def _write(out: Path, result: FitResult, recipe, budget: Budget, cfg: FitConfig, source: str, ref: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(recipe.to_yaml())
    (out / "recipe.txt").write_text(recipe.to_string() + "\n")
    write_json_atomic(out / "fit.json", {
        "model": source, "budget": asdict(budget), "budget_desc": budget.describe(), "met": result.met,
        "verdict": result.verdict, "recipe": result.recipe, "recipe_yaml": recipe.to_yaml(), "row": result.row,
        "reference_ppl": ref["ppl"], "attempts": result.attempts, "sensitivity": asdict(cfg.sensitivity)})
