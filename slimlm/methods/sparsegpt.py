"""SparseGPT (Frantar & Alistarh 2023): prune a layer column by column and update the
weights not yet visited so that the layer's output on the calibration inputs moves little.

The layer objective is ‖(W − Ŵ) Xᵀ‖² with H = XᵀX/n (the engine's `hessian`). With U the
upper Cholesky factor of the damped H⁻¹ (H⁻¹ = UᵀU), removing weight w[r, j] costs
w[r, j]² / U[j, j]² (the OBS saliency), and its error is compensated by moving the later
columns of row r by −w[r, j]/U[j, j] · U[j, k]. Columns run left to right in lazy blocks
of `block`; the mask of a block is chosen when the loop reaches it (adaptive mask
selection), from weights that already carry the updates of earlier blocks:

  unstructured  the lowest-saliency `sparsity` share of the block's weights
  N:M           in every group of m columns, each row keeps its n highest saliencies

The kept weights are stored with the pruned positions (a `Sparse` format); a later
quantization stage composes through `Sparse.absorb`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm.errors import SlimlmError
from slimlm.methods.magnitude import PruneConfig, Scope, check_prune, keep_mask, pack_pruned
from slimlm.methods.registry import Kind, register

MAX_DAMP_TRIES = 6


@dataclass(frozen=True)
class SparseGPTConfig(PruneConfig):
    damp: float = 0.01  # a fraction of the mean diagonal of H
    block: int = 128  # columns per lazy block (and per mask selection)

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.damp <= 10:
            raise SlimlmError(f"damp is a fraction of the mean Hessian diagonal in [0, 10], got {self.damp}")
        if self.block < 1:
            raise SlimlmError(f"block must be at least 1 column, got {self.block}")


def hinv_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U (in, in) float32 upper triangular with UᵀU = (H + λI)⁻¹, λ = damp · mean
    diag H (tenfold more while H is not positive definite); dead (in,) marks inputs that were
    always zero — they get diagonal 1 and decouple."""
    h = hessian.detach().to(torch.float64).clone()
    dead = h.diagonal() <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h.diagonal()[dead] = 1.0
    mean = h.diagonal().mean()
    d = damp
    for _ in range(MAX_DAMP_TRIES):
        l, info = torch.linalg.cholesky_ex(h + d * mean * torch.eye(h.shape[0], dtype=h.dtype))
        if info == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(l), upper=True)
            if info == 0 and torch.isfinite(u).all():
                return u.float(), dead
        d = d * 10 if d > 0 else 1e-4
    raise SlimlmError("the calibration Hessian is not positive definite even with heavy damping; "
                      "use more calibration tokens")


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, fraction: float, nm: tuple[int, int] | None,
                    damp: float = 0.01, block: int = 128, mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT of `weight` (out, in) under `hessian` (in, in). Returns (W', mask): the
    updated weights (pruned positions exactly 0) and the (out, in) bool keep mask. A given
    `mask` is used as it is instead of being selected (only the weight update runs)."""
    w = weight.detach().float().clone()
    out, inp = w.shape
    u, dead = hinv_factor(hessian, damp)
    w[:, dead] = 0  # inputs that never fire: their weights do nothing
    if nm is not None:
        block = max(block // nm[1], 1) * nm[1]  # N:M groups never straddle a block
    fixed = mask is not None
    mask = mask.clone() if fixed else torch.ones(out, inp, dtype=torch.bool)
    for b0 in range(0, inp, block):
        b1 = min(b0 + block, inp)
        wb = w[:, b0:b1]  # (out, B) view, updated in place
        ub = u[b0:b1, b0:b1]
        if not fixed:  # OBS saliency w² / [H⁻¹]_jj of the block's weights, (out, B)
            saliency = wb.pow(2) / ub.diagonal().pow(2).unsqueeze(0)
            mask[:, b0:b1] = keep_mask(saliency, fraction, nm, Scope.LAYER if nm is None else Scope.ROW)
        mb = mask[:, b0:b1]
        err = torch.zeros(out, b1 - b0)
        for i in range(b1 - b0):
            col = wb[:, i]
            q = col * mb[:, i]  # the pruned weights of column i become 0
            e = (col - q) / ub[i, i]  # (out,)
            wb[:, i] = q
            err[:, i] = e
            if i + 1 < b1 - b0:
                wb[:, i + 1:] -= torch.outer(e, ub[i, i + 1:])
        if b1 < inp:  # every later column at once
            w[:, b1:] -= err @ u[b0:b1, b1:]
    w[~mask] = 0
    return w, mask


@register("sparsegpt", SparseGPTConfig, needs=("hessian",), kind=Kind.PRUNE, check=check_prune)
def sparsegpt(weight, stats, config: SparseGPTConfig):
    """Hessian-based pruning with weight update (SparseGPT), unstructured or N:M."""
    if stats.hessian is None:
        raise SlimlmError(f"sparsegpt needs calibration statistics for {stats.name}; run it through the compression engine")
    w, mask = sparsegpt_prune(weight, stats.hessian, config.fraction, config.nm, config.damp, config.block)
    return pack_pruned(w, mask, config)
