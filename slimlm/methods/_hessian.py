"""Hessian-based primitives shared by GPTQ, SpQR and AWQ+GPTQ (and reusable by vector quantizers).

The layer objective is ‖(W − Ŵ) Xᵀ‖², whose Hessian in each row of W is H = 2XᵀX/n; the
factor 2 and 1/n do not change any decision below, so the engine's mean XᵀX/n is used as
it is. Pure tensor functions, no model:

    damped_hessian      dampening + dead input channels, float64
    inverse_cholesky    upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), retrying with more damping
    gptq_columns        the column-by-column quantizer with error feedback in lazy blocks
    weighted_clip_params  per-group affine parameters whose clipping minimises a weighted error
"""

from __future__ import annotations

from typing import Callable

import torch

from slimlm.errors import SlimlmError
from slimlm.methods.affine import _grouped, affine_params, dequantize_codes, quantize_codes

MAX_DAMP_TRIES = 6  # damping × 10 per failed Cholesky: 1 % -> 10 000 % of the mean diagonal



def validate_solver_options(damp: float, block: int | None = None) -> None:
    """A config's Hessian damping (fraction of the mean diagonal) and lazy-block width."""
    if not 0 <= damp <= 10:
        raise SlimlmError(f"damp is a fraction of the mean Hessian diagonal in [0, 10], got {damp}")
    if block is not None and block < 1:
        raise SlimlmError(f"block must be at least 1 column, got {block}")

def damped_hessian(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(H + damp·mean(diag H)·I, dead) in float64, where `dead` (in,) marks input channels that
    never saw a non-zero value (zero diagonal); their diagonal becomes 1 so they decouple
    from the others and are simply rounded."""
    h = hessian.detach().to(torch.float64).clone()
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise SlimlmError(f"Hessian must be a square matrix, got shape {tuple(h.shape)}")
    if not torch.isfinite(h).all():
        raise SlimlmError("the calibration Hessian holds NaN or Inf values; check the calibration text and model")
    diag = h.diagonal()
    dead = diag <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    diag[dead] = 1.0
    live = diag[~dead]
    mean = live.mean() if live.numel() else torch.tensor(1.0, dtype=torch.float64)
    diag += damp * mean
    return h, dead


def inverse_cholesky(hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, float]:
    """Upper-triangular U with UᵀU = (H + damping)⁻¹, float32, and the damping used.

    The damping starts at `damp` × mean diagonal and grows tenfold while the Cholesky
    factorisation fails (an ill-conditioned or rank-deficient H); U's rows are what GPTQ
    needs: U[j, j] scales column j's error, U[j, j+1:] spreads it over later columns."""
    base, _ = damped_hessian(hessian, 0.0)
    mean = base.diagonal().mean()
    d = damp
    for _ in range(MAX_DAMP_TRIES):
        h = base.clone()
        h.diagonal().add_(d * mean)
        l, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            hinv = torch.cholesky_inverse(l)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info == 0 and torch.isfinite(u).all():
                return u.to(torch.float32), d
        d = d * 10 if d > 0 else 1e-4
    raise SlimlmError("the calibration Hessian is not positive definite even with heavy damping; "
                      "use more calibration tokens")


def gptq_columns(weight: torch.Tensor, u: torch.Tensor, quantize: Callable[[int, torch.Tensor], torch.Tensor],
                 block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the columns of `weight` (out, in) in order with GPTQ error feedback.

    `u` (in, in) is `inverse_cholesky`'s factor for the same column order (permute both
    first for act-order). `quantize(j, cols)` is called for j = 0 .. in−1 in order; `cols`
    (out, k) is a view of the working weights from column j to the end of the current lazy
    block — column j and those after it have received the error of every column before j
    — and it returns column j's quantized values (out,) (return `cols[:, 0]` to keep a
    weight exact, e.g. an outlier). A quantizer with groups of columns can set a group's
    parameters from `cols[:, :group]` when j starts a group, provided `block` is a multiple
    of the group. Returns (Q (out, in) quantized weights, loss (in,) the per-column error
    ‖w − q‖² / U[j, j]² each column added to the objective).
    """
    w = weight.detach().to(torch.float32).clone()
    out, n = w.shape
    q_all = torch.empty_like(w)
    loss = torch.zeros(n, dtype=torch.float32)
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        wb = w[:, b0:b1]  # (out, B) view, updated in place within the block
        err = torch.empty(out, b1 - b0)
        for i in range(b1 - b0):
            j = b0 + i
            col = wb[:, i]
            q = quantize(j, wb[:, i:])
            d = u[j, j]
            e = (col - q) / d  # (out,)
            loss[j] = (e * e).sum()
            q_all[:, j] = q
            err[:, i] = e
            if i + 1 < b1 - b0:
                wb[:, i + 1:] -= torch.outer(e, u[j, j + 1:b1])
        if b1 < n:  # the lazy update of every later column at once
            w[:, b1:] -= err @ u[b0:b1, b1:]
    return q_all, loss


def weighted_clip_params(w: torch.Tensor, bits: int, group: int, weights: torch.Tensor | None = None,
                         grid: int = 20, max_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric per-group (scale, min), each (out, G) fp16-rounded, with each group's range
    shrunk by the factor in {1, 1 − max_shrink/grid, …, 1 − max_shrink} that minimises
    Σ weights[c]·(w − ŵ)² over the group (weights (in,), e.g. diag H; None: uniform).
    Shrinking clips a few large weights to give the rest a finer step."""
    out, inp = w.shape
    w = w.float()
    wt = torch.ones(inp) if weights is None else weights.float().clamp(min=0)
    wt_g = _grouped(wt.unsqueeze(0), group)[0]  # (G, group); padded columns repeat the last weight
    wg = _grouped(w, group)  # (out, G, group)
    pad = wg.shape[1] * group - inp
    if pad:  # padded columns must not count twice
        wt_g = wt_g.clone()
        wt_g[-1, group - pad:] = 0
    lo, hi = wg.amin(-1), wg.amax(-1)
    best_err = torch.full(lo.shape, float("inf"))
    best_s, best_m = affine_params(w, bits, group, False)
    maxq = (1 << bits) - 1
    for k in range(grid + 1):
        f = 1.0 - max_shrink * k / grid
        s = ((hi - lo) * f / maxq).half().float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        m = (lo * f).half().float()
        q = torch.round((wg - m.unsqueeze(-1)) / s.unsqueeze(-1)).clamp(0, maxq)
        e = ((q * s.unsqueeze(-1) + m.unsqueeze(-1) - wg) ** 2 * wt_g).sum(-1)  # (out, G)
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_s = torch.where(better, s, best_s)
        best_m = torch.where(better, m, best_m)
    return best_s, best_m


def static_group_quantizer(scale: torch.Tensor, mins: torch.Tensor | None, bits: int, group: int,
                           perm: torch.Tensor | None, codes: torch.Tensor) -> Callable:
    """A `gptq_columns` quantizer for fixed per-group parameters (out, G) of the original
    column order: processed column j is original column perm[j]; its codes land in
    `codes` (out, in) uint8 at the original position, so the stored layout is plain."""
    order = perm.tolist() if perm is not None else None

    def quantize(j: int, cols: torch.Tensor) -> torch.Tensor:
        c = order[j] if order is not None else j
        g = c // group
        col = cols[:, :1]
        s = scale[:, g:g + 1]
        m = None if mins is None else mins[:, g:g + 1]
        q = quantize_codes(col, s, m, bits, 1)
        codes[:, c] = q[:, 0]
        return dequantize_codes(q, s, m, bits, 1)[:, 0]

    return quantize
