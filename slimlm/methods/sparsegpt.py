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
quantization stage composes through `Sparse.absorb`. With `bits` set, pruning and
quantization are joint, as in the paper: each kept weight is rounded to its group's grid
as the loop reaches it and its rounding error is fed back like a pruned weight's, so the
later columns compensate both (`sparsegpt:sparsity=0.5,bits=4,group=64`). The grids (fp16
scale and minimum per group, asymmetric unless `sym`) span the group's kept weights as a
first, pruning-only pass leaves them; the second pass keeps that mask and rounds. (Grids
set from weights not yet updated fit badly: pruning half a row moves the rest a lot.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm.errors import SlimlmError
from slimlm.formats import bitpack
from slimlm.formats.sparse import Sparse
from slimlm.methods.affine import check_group, FP16_MAX, validate_group_option
from slimlm.methods.magnitude import PruneConfig, Scope, check_prune, keep_mask, pack_pruned
from slimlm.methods.registry import Kind, register
from slimlm.methods._hessian import validate_solver_options

MAX_DAMP_TRIES = 6


@dataclass(frozen=True)
class SparseGPTConfig(PruneConfig):
    ALIASES = {"group": {"channel": 0}}
    damp: float = 0.01  # a fraction of the mean diagonal of H
    block: int = 128  # columns per lazy block (and per mask selection)
    bits: int = 0  # > 0: quantize the kept weights jointly (2..8 bits)
    group: int = 64  # quantization group along the input (0 = per channel)
    sym: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.bits and not 2 <= self.bits <= 8:
            raise SlimlmError(f"bits must be 0 (no quantization) or in 2..8, got {self.bits}")
        validate_group_option(self.group)
        validate_solver_options(self.damp, self.block)


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


class GroupQuantizer:
    """Rounds kept weights column by column on fixed per-group fp16 grids; codes land in
    `codes` (out, in). The grids span the kept weights of each group of `w` (out, in), the
    result of pruning alone, which the joint pass stays close to."""

    def __init__(self, w: torch.Tensor, keep: torch.Tensor, bits: int, group: int, sym: bool):
        self.bits, self.group, self.sym = bits, group, sym
        out, inp = w.shape
        self.codes = torch.zeros(out, inp, dtype=torch.uint8)
        big = torch.finfo(torch.float32).max
        pad = -inp % group  # the last group may be shorter: pad with pruned (ignored) entries
        wg = torch.cat([w, w.new_zeros(out, pad)], 1).view(out, -1, group)
        kg = torch.cat([keep, keep.new_zeros(out, pad)], 1).view(out, -1, group)
        empty = ~kg.any(-1)  # (out, G) groups with nothing kept: any grid, codes unused
        lo = torch.where(empty, 0.0, torch.where(kg, wg, big).amin(-1))
        hi = torch.where(empty, 0.0, torch.where(kg, wg, -big).amax(-1))
        if sym:
            s = torch.maximum(hi.abs(), lo.abs()) / ((1 << (bits - 1)) - 1)
            self.mins = None
        else:
            s = (hi - lo) / ((1 << bits) - 1)
            self.mins = lo.clamp(-FP16_MAX, FP16_MAX).half().float()
        s = s.clamp(max=FP16_MAX).half().float()
        self.scales = torch.where(s > 0, s, torch.ones_like(s))  # (out, G)

    def __call__(self, j: int, col: torch.Tensor) -> torch.Tensor:
        """Column j's rounded values (out,) on its group's grid."""
        g = j // self.group
        s = self.scales[:, g]
        if self.sym:
            half = 1 << (self.bits - 1)
            q = torch.round(col / s).clamp(-half, half - 1) + half
            self.codes[:, j] = q.to(torch.uint8)
            return (q - half) * s
        m = self.mins[:, g]
        q = torch.round((col - m) / s).clamp(0, (1 << self.bits) - 1)
        self.codes[:, j] = q.to(torch.uint8)
        return q * s + m

    def packed(self, mask: torch.Tensor, n: int, m: int) -> Sparse:
        base = Sparse.from_dense(torch.zeros(mask.shape), mask, n, m)
        return Sparse(base.out_features, base.in_features, n, m, base.nnz, base.index, bits=self.bits,
                      group=self.group, codes=bitpack.pack(self.codes[mask], self.bits),
                      scales=self.scales.half(), mins=None if self.mins is None else self.mins.half())


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, fraction: float, nm: tuple[int, int] | None,
                    damp: float = 0.01, block: int = 128, mask: torch.Tensor | None = None,
                    quantizer: GroupQuantizer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT of `weight` (out, in) under `hessian` (in, in). Returns (W', mask): the
    updated weights (pruned positions exactly 0) and the (out, in) bool keep mask. A given
    `mask` is used as it is instead of being selected (only the weight update runs). With a
    `quantizer`, kept weights are rounded on its grid as they are reached (joint mode)."""
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
            q = col if quantizer is None else quantizer(b0 + i, col)
            q = q * mb[:, i]  # the pruned weights of column i become 0
            e = (col - q) / ub[i, i]  # (out,)
            wb[:, i] = q
            err[:, i] = e
            if i + 1 < b1 - b0:
                wb[:, i + 1:] -= torch.outer(e, ub[i, i + 1:])
        if b1 < inp:  # every later column at once
            w[:, b1:] -= err @ u[b0:b1, b1:]
    w[~mask] = 0
    return w, mask


def _check(config: SparseGPTConfig, shape: tuple[int, int]) -> None:
    check_prune(config, shape)
    if config.bits:
        check_group(config.group, shape[1])


@register("sparsegpt", SparseGPTConfig, needs=("hessian",), kind=Kind.PRUNE, check=_check)
def sparsegpt(weight, stats, config: SparseGPTConfig):
    """Hessian-based pruning with weight update (SparseGPT), unstructured or N:M."""
    if stats.hessian is None:
        raise SlimlmError(f"sparsegpt needs calibration statistics for {stats.name}; run it through the compression engine")
    if config.bits:
        # pass 1 chooses the mask and where the kept weights end up; pass 2 rounds them on
        # grids spanning those final values, feeding rounding errors forward like pruning's
        w1, mask = sparsegpt_prune(weight, stats.hessian, config.fraction, config.nm, config.damp, config.block)
        quantizer = GroupQuantizer(w1, mask, config.bits, check_group(config.group, weight.shape[1]), config.sym)
        sparsegpt_prune(weight, stats.hessian, config.fraction, config.nm, config.damp, config.block,
                        mask=mask, quantizer=quantizer)
        n, m = config.nm or (0, 0)
        return quantizer.packed(mask, n, m)
    w, mask = sparsegpt_prune(weight, stats.hessian, config.fraction, config.nm, config.damp, config.block)
    return pack_pruned(w, mask, config)
