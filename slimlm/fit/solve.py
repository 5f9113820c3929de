"""Choosing one candidate per layer under a bit budget, and writing the choice as a recipe.

The choice is a multiple-choice knapsack: layer ℓ takes candidate c at cost k(ℓ, c)
(predicted KL) and size s(ℓ, c) (stored bits); minimise Σ k subject to Σ s ≤ B. Sizes
are rounded *up* to units of `unit` bits (≈ the largest total / RESOLUTION), so a
solution of the rounded problem always fits the true budget; the dynamic programme over
capacities is then exact for the rounded sizes:

    f_ℓ(b) = min_c f_{ℓ−1}(b − s'(ℓ, c)) + k(ℓ, c)          f_0(b) = 0 for every b ≥ 0

f_L(b) is the least predicted loss within b units for every b at once, so the same
table answers "least loss within a size" and "least size within a loss".
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from slimlm.compress.recipe import Recipe
from slimlm.fit.presets import KEEP_DENSE

RESOLUTION = 20000  # capacity cells of the dynamic programme


@dataclass
class Plan:
    """The DP table of one problem: layers × candidates."""

    layers: list[str]
    cands: list[str]
    cost: np.ndarray  # (L, C) predicted loss, inf where a candidate cannot store a layer
    bits: np.ndarray  # (L, C) int64 stored bits (0 where unavailable)
    unit: int  # bits per capacity cell
    f: np.ndarray  # (cells + 1,) least total cost within b cells
    arg: np.ndarray  # (L, cells + 1) int16: the candidate layer ℓ takes at capacity b (−1: none fits)

    def min_bits(self) -> int:
        """Stored bits when every layer takes its smallest available candidate."""
        b = np.where(np.isfinite(self.cost), self.bits, np.iinfo(np.int64).max)
        return int(b.min(1).sum())

    def choose(self, max_bits: int | None = None, max_cost: float | None = None) -> dict[str, str] | None:
        """Layer -> candidate with the least cost within `max_bits`, or — with `max_cost` — the
        least bits whose cost stays within `max_cost` (and `max_bits`); None when nothing fits."""
        top = len(self.f) - 1
        cap = top if max_bits is None else min(top, max_bits // self.unit)
        if cap < 0 or not np.isfinite(self.f[cap]):
            return self._smallest(max_bits, max_cost)
        if max_cost is not None:
            ok = np.flatnonzero(self.f[: cap + 1] <= max_cost)
            if ok.size == 0:
                return None
            cap = int(ok[0])
        choice = {}
        for li in range(len(self.layers) - 1, -1, -1):  # walk back through the table
            c = int(self.arg[li, cap])
            choice[self.layers[li]] = self.cands[c]
            cap -= self.w[li, c]
        return choice

    def _smallest(self, max_bits: int | None, max_cost: float | None) -> dict[str, str] | None:
        """Every layer at its smallest candidate, if that fits: sizes rounded up to cells can
        miss a budget just above min_bits() that the true sizes meet."""
        pick = np.where(np.isfinite(self.cost), self.bits, np.iinfo(np.int64).max).argmin(1)
        rows = np.arange(len(self.layers))
        if max_bits is not None and self.bits[rows, pick].sum() > max_bits:
            return None
        if max_cost is not None and self.cost[rows, pick].sum() > max_cost:
            return None
        return {n: self.cands[c] for n, c in zip(self.layers, pick)}

    @property
    def w(self) -> np.ndarray:
        return -(-self.bits // self.unit)  # sizes in cells, rounded up


def build_plan(layers: list[str], cands: list[str], cost: np.ndarray, bits: np.ndarray) -> Plan:
    """Run the dynamic programme for every capacity up to all layers at their largest candidate."""
    cost = np.asarray(cost, dtype=np.float64)
    bits = np.asarray(bits, dtype=np.int64)
    avail = np.isfinite(cost)
    if not avail.any(1).all():
        bad = layers[int(np.flatnonzero(~avail.any(1))[0])]
        from slimlm.errors import SlimlmError

        raise SlimlmError(f"no fit candidate can store layer {bad}; add a candidate whose group fits its rows")
    total = int(np.where(avail, bits, 0).max(1).sum())
    unit = max(1, math.ceil(total / RESOLUTION))
    w = -(-bits // unit)
    cells = int(np.where(avail, w, 0).max(1).sum())
    f = np.zeros(cells + 1)
    arg = np.full((len(layers), cells + 1), -1, dtype=np.int16)
    for li in range(len(layers)):
        best = np.full(cells + 1, np.inf)
        for c in np.flatnonzero(avail[li]):
            k = int(w[li, c])
            cand = np.full(cells + 1, np.inf)
            cand[k:] = f[: cells + 1 - k] + cost[li, c]  # (cells+1,)
            better = cand < best
            best[better] = cand[better]
            arg[li, better] = c
        f = best
    return Plan(layers, cands, cost, bits, unit, f, arg)


def recipe_from_choice(choice: dict[str, str], layers: list[str], blocks_path: str, head: str | None = None) -> Recipe:
    """A recipe giving each block linear in `layers` its chosen one-stage candidate: the most
    common candidate for every layer, then per layer role (e.g. `mlp.down_proj`) its most
    common one where it differs, then the remaining layers by name; last the output `head`'s
    choice as a stage naming it (`…@lm_head`), unless it is KEEP_DENSE. Later stages win
    (slimlm.compress.recipe)."""
    base = Counter(choice[n] for n in layers).most_common(1)[0][0]
    lines = [base]
    role_of = {n: n[len(blocks_path) + 1:].split(".", 1)[1] for n in layers}  # "3.mlp.down_proj" -> "mlp.down_proj"
    effective = {n: base for n in layers}
    for role in dict.fromkeys(role_of.values()):
        members = [n for n in layers if role_of[n] == role]
        top = Counter(choice[n] for n in members).most_common(1)[0][0]
        if top != base:
            lines.append(f"{top}@*.{role}")
            for n in members:
                effective[n] = top
    by_cand: dict[str, list[str]] = {}
    for n in layers:
        if choice[n] != effective[n]:
            by_cand.setdefault(choice[n], []).append(n)
    lines += [f"{c}@{'|'.join(names)}" for c, names in by_cand.items()]
    if head is not None and choice[head] != KEEP_DENSE:
        lines.append(f"{choice[head]}@{head}")
    recipe = Recipe.parse("+".join(lines))
    for n in layers:  # the recipe must say exactly what was chosen
        got = "+".join(s.to_string() for s in recipe.stages_for(n)).split("@")[0]
        assert got == choice[n], (n, got, choice[n])
    if head is not None:
        got = "+".join(s.to_string() for s in recipe.stages_for(head, explicit=True)).split("@")[0] or KEEP_DENSE
        assert got == choice[head], (head, got, choice[head])
    return recipe
