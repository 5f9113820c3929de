"""Private primitives of `kmeans` and `vq`: weighted k-means and Hessian error feedback.

Pure tensor functions, no model:

- `weighted_kmeans`: Lloyd's algorithm on (n, d) points with a non-negative weight per
  coordinate (the Hessian diagonal), distances as one matmul per chunk of points;
- `grouped_kmeans_1d`: many independent 1-D weighted k-means at once (one lookup
  table per group of rows), assignment by `searchsorted` on sorted levels;
- `inverse_hessian_factor` + `feedback_quantize`: GPTQ's column loop, generalised to
  quantizing `step` columns jointly (a vector), with the optimal update of the columns
  not yet quantized (Frantar et al. 2022, the vector form as in GPTVQ / VPTQ).
"""

from __future__ import annotations

from typing import Callable

import torch


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def weighted_kmeans(x: torch.Tensor, w: torch.Tensor | None, k: int, iters: int = 12, seed: int = 0,
                    chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Weighted k-means of points x (n, d): minimises Σ_i Σ_t w[i,t]·(x[i,t] − c[a_i,t])².

    Returns (centroids (k, d), assignment (n,) int64, objective after each assignment
    step). The objective never increases: each assignment is the exact argmin and each
    update the exact per-coordinate weighted mean; an empty cluster is moved onto the
    point with the largest current error. Deterministic for a given `seed`.
    """
    x = x.float()
    n, d = x.shape
    w = torch.ones_like(x) if w is None else w.float().clamp_min(0)
    c = kmeans_pp(x, w, k, _gen(seed))  # (k, d)
    history: list[float] = []
    for it in range(iters + 1):
        a, err = assign_weighted(x, w, c, chunk)  # (n,), (n,)
        history.append(float(err.sum()))
        if it == iters:
            break
        num = torch.zeros(k, d).index_add_(0, a, w * x)  # Σ w·x per cluster and coordinate
        den = torch.zeros(k, d).index_add_(0, a, w)
        new = torch.where(den > 0, num / den.clamp_min(1e-30), c)
        empty = (den.sum(1) == 0).nonzero().flatten()
        if empty.numel():  # reseed empty clusters at the worst-served points
            worst = err.topk(min(empty.numel(), n)).indices
            new[empty[: worst.numel()]] = x[worst]
        c = new
    return c, a, history


def kmeans_pp(x: torch.Tensor, w: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) under the weighted distance: each new
    centroid is a point drawn with probability ∝ its weighted squared distance to the
    nearest centroid so far. One O(n·d) update per centroid."""
    n = x.shape[0]
    c = torch.empty(k, x.shape[1])
    c[0] = x[torch.randint(0, n, (1,), generator=g)]
    best = (w * (x - c[0]) ** 2).sum(1)  # (n,)
    for i in range(1, k):
        cdf = best.cumsum(0)
        if cdf[-1] > 0:  # inverse-CDF draw (cheaper than multinomial at this size)
            j = torch.searchsorted(cdf, torch.rand(1, generator=g) * cdf[-1]).clamp(max=n - 1)
        else:  # fewer distinct points than centroids: duplicates are harmless
            j = torch.randint(0, n, (1,), generator=g)
        c[i] = x[j]
        best = torch.minimum(best, (w * (x - c[i]) ** 2).sum(1))
    return c


def assign_weighted(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor, chunk: int = 8192):
    """Nearest centroid under per-coordinate weights: (assignment (n,), weighted error (n,)).

    ‖x − c‖²_w = Σ w·x² − 2 (w⊙x)·c + w·c²: one (chunk, 2d) @ (2d, k) matmul per chunk."""
    a_out, e_out = [], []
    cc = torch.cat([c * c, -2 * c], 1).T  # (2d, k)
    for i in range(0, x.shape[0], chunk):
        xs, ws = x[i:i + chunk], w[i:i + chunk]
        dist = torch.cat([ws, ws * xs], 1) @ cc  # (chunk, k), without the constant Σ w·x²
        best, a = dist.min(1)
        a_out.append(a)
        e_out.append((best + (ws * xs * xs).sum(1)).clamp_min(0))
    return torch.cat(a_out), torch.cat(e_out)


def grouped_kmeans_1d(x: torch.Tensor, w: torch.Tensor | None, k: int, iters: int = 20):
    """Independent weighted 1-D k-means for each row of x (G, n): levels (G, k), sorted.

    Levels start at the weighted quantiles (i + ½)/k of each group; assignment is the
    nearest level (`searchsorted` on the midpoints). Returns (levels, codes (G, n) int64,
    objective history)."""
    x = x.float()
    G, n = x.shape
    w = torch.ones_like(x) if w is None else w.float().clamp_min(0) + 1e-12  # keep every point in play
    xs, order = x.sort(1)
    cw = w.gather(1, order).cumsum(1)
    cw = cw / cw[:, -1:]
    q = (torch.arange(k, dtype=torch.float32) + 0.5) / k  # (k,)
    at = torch.searchsorted(cw.contiguous(), q.expand(G, k).contiguous()).clamp(max=n - 1)
    levels = xs.gather(1, at)  # (G, k) weighted quantiles
    history = []
    for it in range(iters + 1):
        levels = levels.sort(1).values
        codes = nearest_level(x, levels)
        err = w * (x - levels.gather(1, codes)) ** 2
        history.append(float(err.sum()))
        if it == iters:
            break
        num = torch.zeros(G, k).scatter_add_(1, codes, w * x)
        den = torch.zeros(G, k).scatter_add_(1, codes, w)
        levels = torch.where(den > 0, num / den.clamp_min(1e-30), levels)
    return levels, codes, history


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted `levels` (G, k) for every x (G, n); a tie goes to
    the lower level. Counts the midpoints below x: `searchsorted` for many x per group,
    one broadcast compare for a single column (cheaper at that size)."""
    mid = (levels[:, 1:] + levels[:, :-1]) / 2  # (G, k-1)
    if x.shape[1] == 1:
        return (x > mid).sum(1, keepdim=True)
    return torch.searchsorted(mid.contiguous(), x.contiguous())


# ---- error feedback -----------------------------------------------------------------------------


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """U, upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean diag(H), float32, and the
    mask of dead input channels (diag 0: never active in calibration; their weights are free).

    Row j of U, divided by U[j, j], is how the error of column j spreads onto the later
    columns once the earlier ones are fixed (GPTQ)."""
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    lam = damp * torch.diag(h).mean()
    h.diagonal().add_(lam)
    for extra in (0.0, 1e-6, 1e-4, 1e-2):  # add jitter only if Cholesky fails numerically
        try:
            L = torch.linalg.cholesky(h + extra * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype))
            hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(hinv, upper=True).float(), dead
        except torch.linalg.LinAlgError:
            continue
    raise RuntimeError("the Hessian is not positive definite even after damping")


QuantFn = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


def feedback_quantize(w: torch.Tensor, u: torch.Tensor, step: int, quant: QuantFn, block: int = 128) -> torch.Tensor:
    """GPTQ's loop over columns of w (out, n), `step` columns at a time.

    `quant(cols (out, s), first_column, U_ss (s, s)) -> (out, s)` quantizes s ≤ step columns
    jointly; the loss of a choice q is ‖(cols − q)·U_ss⁻¹‖² (OBQ), so a quantizer that
    minimises that metric is Hessian-optimal for the block. The scaled error
    (cols − q)·U_ss⁻¹ is then pushed onto the later columns through U's rows. Returns
    the quantized (out, n) matrix; `w` is not modified."""
    w = w.float().clone()
    out, n = w.shape
    block = max(step, block // step * step)
    q_all = torch.empty_like(w)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = w[:, i1:i2]  # a view: updates land in w
        e1 = torch.empty(out, i2 - i1)
        for j in range(0, i2 - i1, step):
            j2 = min(j + step, i2 - i1)
            uss = u[i1 + j:i1 + j2, i1 + j:i1 + j2]  # (s, s) upper triangular
            q = quant(w1[:, j:j2], i1 + j, uss)
            q_all[:, i1 + j:i1 + j2] = q
            if step == 1:  # scalar GPTQ: a division instead of a 1×1 triangular solve
                err = (w1[:, j:j2] - q) / uss
            else:
                err = torch.linalg.solve_triangular(uss, w1[:, j:j2] - q, upper=True, left=False)  # (out, s)
            w1[:, j2:] -= err @ u[i1 + j:i1 + j2, i1 + j2:i2]
            e1[:, j:j2] = err
        w[:, i2:] -= e1 @ u[i1:i2, i2:]
    return q_all


def layer_loss(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W − Q) H (W − Q)ᵀ): the expected squared output error per calibration token."""
    e = (w - q).double()
    return float(((e @ h.double()) * e).sum())
