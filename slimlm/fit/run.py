"""`fit`: the least-loss per-layer mix of formats that meets a budget, compressed and measured.

    1. sensitivity   each layer × candidate: stored bits and predicted KL (cached)
    2. solve         knapsack over the layers (slimlm.fit.solve) within the bit budget the
                     size (slimlm.fit.size) / bpw limits leave, or the least bits within a loss budget
                     (predicted KL summed over layers ≈ increase of the log perplexity)
    3. compress      with the chosen mix written as a recipe (the sequential engine)
    4. measure       evaluate against the reference (and bench when a speed limit is set)
    5. check         every limit against the measurement; when one is broken, tighten the
                     bit or loss budget by what was missed and go back to 2 (a few times)

The output head is one more layer when fit may compress it (`head`; by default under a
size limit, where it is most of what is left, e.g. 113 MB of a 538 MB model with tied
embeddings): its options are data-free RTN (fit_head_candidates) or left dense, its
stage is written `…@lm_head`, and it counts in every limit the block linears count in —
the saved size, and --max-bpw, whose weights then include the head's. Otherwise the
head stays as it is and --max-bpw counts the block linears only.

The result is respected or refused with a sentence saying which limit and by how much;
the recipe (YAML and one line), the compressed model and fit.json land in `out_dir`.
"""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from slimlm.compress import CalibrationConfig, Recipe, compress_model
from slimlm.errors import SlimlmError
from slimlm.eval.run import EvalConfig, evaluate
from slimlm.fit.budget import Budget
from slimlm.fit.presets import KEEP_DENSE, fit_candidates, fit_head_candidates
from slimlm.fit.sensitivity import SensitivityConfig, SensitivityTable, measure
from slimlm.fit.size import SizeModel
from slimlm.fit.solve import Plan, build_plan, recipe_from_choice
from slimlm.formats import CompressedLinear
from slimlm.formats.store import save_compressed
from slimlm.loading import load
from slimlm.sweep import write_json_atomic


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
    head: bool | None = None  # may fit compress the output head? None: when the budget limits the size

    def __post_init__(self):
        if self.attempts < 1:
            raise SlimlmError(f"fit needs at least one attempt, got {self.attempts}")

    @property
    def fits_head(self) -> bool:
        return self.budget.max_size_bytes is not None if self.head is None else self.head


@dataclass
class FitResult:
    recipe: str
    row: dict  # the measured result, as a sweep row
    met: bool
    verdict: str
    attempts: list[dict] = field(default_factory=list)


def run_fit(source: str, cfg: FitConfig, progress: bool = True) -> FitResult:
    """Fit `source` to `cfg.budget`; see the module docstring."""
    budget = cfg.budget
    out = Path(cfg.out_dir)
    cands = list(cfg.candidates) or fit_candidates(cfg.methods or None)
    reference = load(source)
    cands = [Recipe.parse(c).to_string() for c in cands]
    head_cands = [*fit_head_candidates(), KEEP_DENSE] if cfg.fits_head else []
    table = measure(reference, cands, cfg.sensitivity, cache_dir=out / "cache", progress=progress,
                    head_candidates=head_cands[:-1])
    sizes = SizeModel.of(reference, cfg.fits_head)
    layers = table.layers + ([table.head] if cfg.fits_head else [])
    names = list(dict.fromkeys([*cands, *head_cands]))
    cost, bits = _matrices(table, layers, names, {n: cands for n in table.layers} | {table.head: head_cands}, sizes)
    plan = build_plan(layers, names, cost, bits)
    numel = sum(table.numel[n] for n in layers)  # the weights --max-bpw counts

    max_bits = _bit_budget(budget, sizes, numel, plan)
    max_cost = math.log1p(budget.max_ppl_increase) if budget.max_ppl_increase is not None else None
    ref = evaluate(reference, cfg.eval, reference=None, progress=False)
    attempts = []
    row, recipe, why_not = None, None, ""
    for attempt in range(cfg.attempts):
        choice = plan.choose(max_bits, max_cost)
        if choice is None:
            raise SlimlmError(_infeasible(budget, max_bits, max_cost, plan, numel, sizes))
        recipe = recipe_from_choice(choice, table.layers, reference.adapter.blocks_path, head=sizes.head)
        predicted = float(sum(cost[i, names.index(choice[n])] for i, n in enumerate(layers)))
        chosen_bits = int(sum(bits[i, names.index(choice[n])] for i, n in enumerate(layers)))
        row = _compress_and_measure(reference, recipe, cfg, out / "model", budget, progress)
        row["predicted_kl"] = predicted
        row["predicted_size_bytes"] = sizes.predicted_bytes(chosen_bits, recipe)
        row["ratio"] = row["ppl"] / ref["ppl"]
        if cfg.fits_head:  # --max-bpw counts the head too
            row["bpw_with_head"] = (row["linear_bits"] + row["head_bits"]) / numel
        broken = budget.violations(row, ref["ppl"])
        attempts.append({"recipe": recipe.to_string(), "max_bits": max_bits, "max_cost": max_cost,
                         "bpw": row["bpw"], "head_bpw": row["head_bpw"], "size_bytes": row["size_bytes"],
                         "predicted_size_bytes": row["predicted_size_bytes"], "ppl": row["ppl"], "kl": row["kl"],
                         "predicted_kl": predicted, "broken": broken})
        if not broken:
            break
        max_bits, max_cost, why_not = _tighten(budget, row, ref["ppl"], max_bits, max_cost, numel, cfg.fits_head)
        if why_not:
            break
    broken = attempts[-1]["broken"]
    if broken:
        verdict = (f"Budget not met after {len(attempts)} attempt(s): " + "; ".join(broken) + "."
                   + (f" {why_not}" if why_not else ""))
    else:
        head = "" if row["head_bpw"] is None else f" (head {row['head_bpw']:.3f})"
        verdict = (f"Budget met: {row['bpw']:.3f} bpw{head}, {row['size_bytes'] / 1e6:.2f} MB, "
                   f"perplexity ×{row['ratio']:.4f}, KL {row['kl']:.4f} (predicted {row['predicted_kl']:.4f}).")
    result = FitResult(recipe=recipe.to_string(), row=row, met=not broken, verdict=verdict, attempts=attempts)
    _write(out, result, recipe, budget, cfg, source, ref)
    return result


def _matrices(table: SensitivityTable, layers: list[str], names: list[str], allowed: dict[str, list[str]],
              sizes: SizeModel):
    """(L, C) predicted KL and stored bits of candidate `names` (inf / 0 where a layer may not
    take one or it cannot store the layer); the head's KEEP_DENSE costs nothing and stores
    its dense table."""
    cost = np.full((len(layers), len(names)), np.inf)
    bits = np.zeros((len(layers), len(names)), dtype=np.int64)
    for i, n in enumerate(layers):
        for c in allowed[n]:
            j = names.index(c)
            if c in table.err[n]:
                cost[i, j], bits[i, j] = table.predicted_kl(n, c), table.bits[n][c]
            elif c == KEEP_DENSE:
                cost[i, j], bits[i, j] = 0.0, sizes.head_dense_bits
    return cost, bits


def _bit_budget(budget: Budget, sizes: SizeModel, numel: int, plan: Plan) -> int | None:
    """Stored bits the size and bpw limits leave for the layers fit chooses (None: no limit)."""
    limits = []
    if budget.max_bpw is not None:
        limits.append(int(budget.max_bpw * numel))
    if budget.max_size_bytes is not None:
        room = sizes.room_bits(budget.max_size_bytes)
        if room < plan.min_bits():
            raise SlimlmError(_smallest_size(budget, sizes, plan))
        limits.append(room)
    return min(limits) if limits else None


def _smallest_size(budget: Budget, sizes: SizeModel, plan: Plan) -> str:
    """The refusal of a size limit: the smallest reachable size and what it is made of."""
    smallest = np.where(np.isfinite(plan.cost), plan.bits, np.iinfo(np.int64).max)  # (L, C)
    pick = smallest.argmin(1)  # (L,)
    blocks = [i for i, n in enumerate(plan.layers) if n != sizes.head]
    common = Counter(pick[blocks].tolist()).most_common(1)[0][0]
    parts = [f"the block linears {smallest[blocks, pick[blocks]].sum() / 8e6:.3f} MB at their smallest candidates "
             f"(mostly {plan.cands[common]})"]
    reads = " (also the input embedding, tied)" if sizes.tied else ""
    rest = sizes.rest_bytes + sizes.recipe_allowance
    if sizes.head is not None:
        i = plan.layers.index(sizes.head)
        parts.append(f"the output head {smallest[i, pick[i]] / 8e6:.3f} MB as {plan.cands[pick[i]]}{reads}")
    else:
        rest -= sizes.head_dense_bits // 8
        parts.append(f"the output head {sizes.head_dense_bits / 8e6:.3f} MB left dense{reads}, "
                     "as head compression is off")
    parts.append(f"{rest / 1e6:.3f} MB of everything else (embeddings, norms, tokenizer, config, manifest)")
    least = math.ceil(sizes.predicted_bytes(plan.min_bits()) / 1e3) / 1e3  # MB, rounded up to a kB
    return (f"the size budget of {budget.max_size_bytes / 1e6:.3f} MB cannot be met: the smallest model fit can make "
            f"is {least:.3f} MB — " + ", ".join(parts) + f"; raise --max-size to at least {least:.3f} MB"
            + (", let fit compress the head" if sizes.head is None else "") + " or add smaller candidates")


def _infeasible(budget: Budget, max_bits, max_cost, plan: Plan, numel: int, sizes: SizeModel) -> str:
    if max_bits is not None and max_bits < plan.min_bits():
        if budget.max_size_bytes is not None and sizes.room_bits(budget.max_size_bytes) <= max_bits:
            return _smallest_size(budget, sizes, plan)
        what = "block linears and head" if sizes.head else "block linears"
        return (f"the budget ({budget.describe()}) leaves {max_bits / numel:.3f} bits per weight for the {what} "
                f"but the smallest candidates need {plan.min_bits() / numel:.3f}; "
                "relax the budget or add smaller candidates")
    best = plan.f[-1] if max_bits is None else plan.f[min(len(plan.f) - 1, max_bits // plan.unit)]
    return (f"no mix of the candidates meets {budget.describe()}: the least predicted loss within the size limit is "
            f"a KL of {best:.4f} nats, above the {max_cost:.4f} the perplexity limit allows; relax a limit or add "
            "more precise candidates")


def _tighten(budget: Budget, row, ref_ppl, max_bits, max_cost, numel, with_head: bool):
    """New (max_bits, max_cost) after a measured miss, or a reason no retry can help."""
    if budget.min_decode_tps is not None and row.get("decode_tps", 0.0) < budget.min_decode_tps:
        return max_bits, max_cost, ("Decode speed does not depend on the chosen formats in this runtime (it computes "
                                    "from dequantized weights), so no mix of formats can reach it.")
    stored = row["linear_bits"] + (row["head_bits"] if with_head else 0)  # what the chosen layers store
    if budget.max_size_bytes is not None and row["size_bytes"] > budget.max_size_bytes:
        over = (row["size_bytes"] - budget.max_size_bytes) * 8
        max_bits = stored - over - 8 * 1024  # the measured overshoot plus a margin
    if budget.max_bpw is not None and stored > budget.max_bpw * numel:
        max_bits = min(max_bits, int(budget.max_bpw * numel) - (stored - int(budget.max_bpw * numel)))
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
    head = lm.model.get_submodule(lm.adapter.head_path)
    w = None if isinstance(head, CompressedLinear) else head.weight
    head_bits = head.packed.nbits() if w is None else w.numel() * w.element_size() * 8
    row = {"recipe": recipe.to_string(), "methods": sorted({s.method for s in recipe.stages}), "compress_s": secs,
           "path": str(path), "head_bits": head_bits,
           **{k: r[k] for k in ("bpw", "head_bpw", "size_bytes", "linear_bits", "ppl", "kl", "top1", "tokens")}}
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
        "reference_ppl": ref["ppl"], "attempts": result.attempts, "sensitivity": asdict(cfg.sensitivity),
        "head": cfg.fits_head})
