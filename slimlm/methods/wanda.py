"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models").

Weight w[r, c] is scored |w[r, c]| · ‖X[:, c]‖, its magnitude times the norm of the
input channel it multiplies over the calibration tokens; the lowest scores of each
output row are pruned (or of every group of m for N:M). No weight update, one pass.
‖X[:, c]‖ = sqrt(n · E[x_c²]), and the constant n does not change the ranking, so the
engine's `act_norm` (E[x²]) is all it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.methods.magnitude import PruneConfig, Scope, check_prune, keep_mask, pack_pruned
from slimlm.methods.registry import Kind, register


@dataclass(frozen=True)
class WandaConfig(PruneConfig):
    pass


def wanda_score(weight, act_norm):
    """(out, in) scores |W| · sqrt(E[x²]) from the (in,) input second moment."""
    return weight.abs() * act_norm.sqrt().to(weight.dtype).unsqueeze(0)


@register("wanda", WandaConfig, needs=("act_norm",), kind=Kind.PRUNE, check=check_prune)
def wanda(weight, stats, config: WandaConfig):
    """Prune the lowest |w|·‖x‖ of every output row (Wanda)."""
    mask = keep_mask(wanda_score(weight, stats.act_norm), config.fraction, config.nm, Scope.ROW)
    return pack_pruned(weight, mask, config)
