"""Magnitude pruning, and the pruning primitives Wanda and SparseGPT share.

A pruning method scores every weight, keeps the highest scores and stores the result as
a `Sparse` format (kept values plus a bitmask or N:M codes; see formats/sparse.py). The
amount to prune is one option, `sparsity`: a fraction (`sparsity=0.5`, unstructured)
or an N:M pattern (`sparsity=2:4`: 2 of every 4 consecutive weights of a row kept).

Magnitude scores are |w|; by default the smallest are pruned over the whole layer
(`scope=layer`), as in the classic baseline; `scope=row` prunes each output row alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from slimlm.errors import SlimlmError
from slimlm.formats.sparse import VALUE_DTYPES, Sparse, check_nm
from slimlm.methods.registry import Kind, register


class Scope(str, Enum):
    ROW = "row"  # the same fraction pruned in every output row
    LAYER = "layer"  # one threshold over the whole matrix


def parse_sparsity(text: str) -> tuple[float, tuple[int, int] | None]:
    """'0.5' -> (0.5, None); '2:4' -> (0.5, (2, 4)). Refuses anything else."""
    text = str(text).strip()
    if ":" in text:
        a, _, b = text.partition(":")
        try:
            n, m = int(a), int(b)
        except ValueError:
            raise SlimlmError(f"sparsity {text!r} is neither a fraction nor an N:M pattern such as 2:4") from None
        check_nm(n, m)
        return 1 - n / m, (n, m)
    try:
        f = float(text)
    except ValueError:
        raise SlimlmError(f"sparsity {text!r} is neither a fraction nor an N:M pattern such as 2:4") from None
    if not 0 <= f < 1:
        raise SlimlmError(f"sparsity must be a fraction in [0, 1), got {f}")
    return f, None


@dataclass(frozen=True)
class PruneConfig:
    """What every pruning method takes: how much to prune and how to store the kept values."""

    SHOWN = ("sparsity",)
    sparsity: str = "0.5"  # a fraction, or N:M such as 2:4 / 4:8
    values: str = "float16"  # dtype of the kept values when no quantization follows

    def __post_init__(self):
        object.__setattr__(self, "sparsity", str(self.sparsity))
        parse_sparsity(self.sparsity)
        if self.values not in VALUE_DTYPES:
            raise SlimlmError(f"values must be one of {', '.join(VALUE_DTYPES)}, got {self.values!r}")

    @property
    def fraction(self) -> float:
        return parse_sparsity(self.sparsity)[0]

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_sparsity(self.sparsity)[1]


def check_prune(config: PruneConfig, shape: tuple[int, int]) -> None:
    nm = config.nm
    if nm and shape[1] % nm[1]:
        raise SlimlmError(f"{nm[0]}:{nm[1]} sparsity needs rows whose length is a multiple of {nm[1]}, got {shape[1]}")


def keep_mask(score: torch.Tensor, fraction: float, nm: tuple[int, int] | None, scope: Scope = Scope.ROW) -> torch.Tensor:
    """(out, in) bool mask keeping the highest scores.

    N:M: the n highest of every m consecutive scores of a row. Otherwise the lowest
    round(fraction · count) scores of each row (or of the whole matrix) are pruned; ties
    break by position, so the count is exact."""
    out, inp = score.shape
    if nm is not None:
        n, m = nm
        groups = score.reshape(out, inp // m, m)
        top = groups.topk(n, dim=-1).indices  # (out, in/m, n)
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).reshape(out, inp)
    if scope is Scope.LAYER:
        k = round(fraction * score.numel())
        mask = torch.ones(score.numel(), dtype=torch.bool)
        if k:
            mask[score.reshape(-1).topk(k, largest=False).indices] = False
        return mask.view(out, inp)
    k = round(fraction * inp)
    mask = torch.ones(out, inp, dtype=torch.bool)
    if k:
        mask.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
    return mask


def pack_pruned(w: torch.Tensor, mask: torch.Tensor, config: PruneConfig) -> Sparse:
    n, m = config.nm or (0, 0)
    return Sparse.from_dense(w, mask, n, m, VALUE_DTYPES[config.values])


@dataclass(frozen=True)
class MagnitudeConfig(PruneConfig):
    scope: Scope = Scope.LAYER


@register("magnitude", MagnitudeConfig, kind=Kind.PRUNE, check=check_prune)
def magnitude(weight, stats, config: MagnitudeConfig):
    """Prune the smallest |w| (per layer by default), no calibration."""
    mask = keep_mask(weight.abs(), config.fraction, config.nm, config.scope)
    return pack_pruned(weight, mask, config)
