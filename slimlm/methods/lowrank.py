"""WeLore (Jaiswal et al. 2024, "From GaLore to WeLore"): low-rank factors with a rank per
matrix read from the decay of its singular values, under one global threshold.

For W = U Σ Vᵀ (σ_1 ≥ σ_2 ≥ …), the rank of a matrix is k = #{i : σ_i / σ_1 > threshold}.
The same threshold for every matrix gives non-uniform ranks: matrices whose spectrum
decays fast (low-rank reducible) shrink a lot, the others little or not at all. A matrix
becomes the factors (U_k Σ_k^½)(Σ_k^½ V_kᵀ) only when k < out·in / (out + in) — then the
factors are truly smaller; otherwise it is kept dense, in the same value dtype. The
truncation is the best rank-k approximation in Frobenius norm, with error
‖W − Ŵ‖_F = sqrt(Σ_{i>k} σ_i²).

`welore_act` is the activation-aware variant (in the spirit of ASVD): it factors W·S with
S = diag(sqrt(E[x²])) from calibration, so the discarded directions are the ones the
layer's inputs excite least, and stores (U_k Σ_k^½)(Σ_k^½ V_kᵀ S⁻¹); its rank comes from
the singular values of W·S and its error is exact in ‖(W − Ŵ) S‖_F.

Options: threshold (the global cut on σ_i/σ_1), dtype (of the stored factors and of a
matrix kept dense: float16, bfloat16, float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm.errors import SlimlmError
from slimlm.formats.dense import Dense
from slimlm.formats.lowrank import LowRank, breakeven_rank
from slimlm.formats.sparse import VALUE_DTYPES
from slimlm.methods.registry import register


@dataclass(frozen=True)
class WeLoreConfig:
    SHOWN = ("threshold",)
    threshold: float = 0.1  # keep singular values above this share of the largest
    dtype: str = "float16"

    def __post_init__(self):
        if not 0 <= self.threshold < 1:
            raise SlimlmError(f"threshold is a share of the largest singular value in [0, 1), got {self.threshold}")
        if self.dtype not in VALUE_DTYPES:
            raise SlimlmError(f"dtype must be one of {', '.join(VALUE_DTYPES)}, got {self.dtype!r}")


def rank_for(sigma: torch.Tensor, threshold: float) -> int:
    """The number of singular values (descending) above `threshold` · σ_1."""
    if sigma.numel() == 0 or float(sigma[0]) == 0:
        return 0
    return int((sigma / sigma[0] > threshold).sum())


def welore_factors(weight: torch.Tensor, threshold: float, scale: torch.Tensor | None = None):
    """Truncated SVD of `weight` (out, in), or of weight·diag(scale) when `scale` (in,) is given.

    Returns (u (out, k), v (k, in), sigma (min(out, in),)) in float64, with u·v the
    rank-k approximation of `weight` (the scale undone) and sigma the singular values
    the rank was read from."""
    w = weight.detach().to(torch.float64)
    if scale is not None:
        w = w * scale.to(torch.float64).unsqueeze(0)
    uu, sigma, vt = torch.linalg.svd(w, full_matrices=False)
    k = rank_for(sigma, threshold)
    root = sigma[:k].sqrt()
    u = uu[:, :k] * root.unsqueeze(0)  # (out, k)
    v = root.unsqueeze(1) * vt[:k]  # (k, in)
    if scale is not None:
        v = v / scale.to(torch.float64).unsqueeze(0)
    return u, v, sigma


def pack_lowrank(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dtype: str):
    """Factors when rank k is under the break-even out·in/(out+in), else the dense weight."""
    out, inp = weight.shape
    dt = VALUE_DTYPES[dtype]
    if u.shape[1] < breakeven_rank(out, inp):
        return LowRank(u=u.to(dt).contiguous(), v=v.to(dt).contiguous())
    return Dense(weight=weight.detach().to(dt).contiguous())


@register("welore", WeLoreConfig)
def welore(weight, stats, config: WeLoreConfig):
    """Low rank from singular-value decay under one global threshold (WeLore)."""
    u, v, _ = welore_factors(weight, config.threshold)
    return pack_lowrank(weight, u, v, config.dtype)


def activation_scale(act_norm: torch.Tensor) -> torch.Tensor:
    """sqrt(E[x²]) per input channel, floored so channels that never fire stay invertible."""
    s = act_norm.to(torch.float64).clamp(min=0).sqrt()
    floor = 1e-6 * float(s.max()) if s.numel() and float(s.max()) > 0 else 1.0
    return s.clamp(min=floor)


@register("welore_act", WeLoreConfig, needs=("act_norm",))
def welore_act(weight, stats, config: WeLoreConfig):
    """WeLore on W·diag(‖x‖): activation-aware low rank."""
    if stats.act_norm is None:
        raise SlimlmError(f"welore_act needs calibration statistics for {stats.name}; run it through the compression engine")
    u, v, _ = welore_factors(weight, config.threshold, activation_scale(stats.act_norm))
    return pack_lowrank(weight, u, v, config.dtype)
