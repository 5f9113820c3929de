"""k-means palettization: non-uniform lookup tables of 2^b levels, b-bit indices.

The post-training form of DKM / coremltools' palettizer, made Hessian-aware:

1. rows are grouped `rows` at a time (0 = the whole tensor); each group gets a table of
   2^bits levels from 1-D k-means over its weights, each weight counted with its input
   channel's sensitivity, the Hessian diagonal E[x²] (`sensitivity=hessian`), as in
   SqueezeLLM's sensitivity-weighted k-means;
2. with `feedback` (default) the indices are chosen column by column with GPTQ's error
   feedback, the levels being fixed: each column's rounding error is pushed onto the
   columns not yet assigned. Tables belong to rows, not columns, so processing columns
   in order of decreasing Hessian diagonal (`act_order`) costs no stored bit.

With `keep=n` the n input columns of largest E[x²] (massive activations) are kept in
fp16 and absorb what they can of the other columns' error (`slimlm.methods._keep`);
stored as `KeptColumns` around the `Palette`, 16·n·(out + 1) bits more.

Stored as `Palette`: bits per weight = bits + 16·2^bits / (rows·in); with the defaults
(3 bits, tables of 4 rows) 3.056 on a 576-wide layer and 3.021 on a 1536-wide one.

    kmeans:bits=3                    kmeans:bits=2,rows=1        kmeans:bits=4,rows=0,feedback=false
    kmeans:bits=3,keep=2             two massive-activation columns in fp16: 3.101 bpw (576 wide), 3.038 (1536)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from slimlm.errors import SlimlmError
from slimlm.formats.palette import Palette, n_tables
from slimlm.methods._keep import check_keep, check_keep_fits, with_kept_columns
from slimlm.methods._kmeans import feedback_quantize, grouped_kmeans_1d, inverse_hessian_factor, nearest_level
from slimlm.methods.registry import register


class Sensitivity(str, Enum):
    HESSIAN = "hessian"  # weight each weight by its input channel's E[x²]
    NONE = "none"  # plain k-means


@dataclass(frozen=True)
class KMeansConfig:
    SHOWN = ("bits", "rows")
    bits: int = 3
    rows: int = 4  # rows per lookup table; 0 = one table for the whole tensor
    sensitivity: Sensitivity = Sensitivity.HESSIAN
    feedback: bool = True  # GPTQ error feedback while choosing indices
    act_order: bool = True  # columns in order of decreasing Hessian diagonal (free for palettes)
    damp: float = 0.01  # Hessian damping, fraction of the mean diagonal
    iters: int = 20  # Lloyd iterations
    refit: int = 1  # rounds of least-squares level refit + feedback re-assignment (with feedback only)
    keep: int = 0  # input columns of largest E[x²] kept in fp16 (see slimlm.methods._keep)

    def __post_init__(self):
        if not 1 <= self.bits <= 8:
            raise SlimlmError(f"bits must be in 1..8, got {self.bits}")
        if self.rows < 0:
            raise SlimlmError(f"rows per table must be ≥ 0 (0 = one table per tensor), got {self.rows}")
        if not 0 <= self.damp < 10:
            raise SlimlmError(f"damp must be a small non-negative fraction such as 0.01, got {self.damp}")
        if not 0 <= self.refit <= 10:
            raise SlimlmError(f"refit rounds must be in 0..10, got {self.refit}")
        check_keep(self.keep)
        if not 0 <= self.iters <= 1000:
            raise SlimlmError(f"iters must be in 0..1000, got {self.iters}")


def palette_tables(w: torch.Tensor, importance: torch.Tensor | None, bits: int, rows: int, iters: int) -> torch.Tensor:
    """Lookup tables (T, 2^bits) fp16-rounded and sorted, from weighted k-means of each row group.

    w: (out, in); importance: (in,) per input channel or None."""
    out, inp = w.shape
    rows = rows or out
    t = n_tables(out, rows)
    pad = t * rows - out
    imp = torch.ones(inp) if importance is None else importance.float().clamp_min(0)
    pts = torch.cat([w, w[-1:].expand(pad, inp)]) if pad else w  # (t·rows, in), padded rows weigh 0
    wts = imp.expand(t * rows, inp).clone()
    if pad:
        wts[out:] = 0
    levels, _, _ = grouped_kmeans_1d(pts.reshape(t, rows * inp), wts.reshape(t, rows * inp), 1 << bits, iters)
    return levels.half().float().sort(1).values


def refit_levels(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, table: torch.Tensor, lut: torch.Tensor):
    """Levels minimising tr((W − Q) H (W − Q)ᵀ) for fixed codes: per table the K×K normal
    equations (Σ_r A_rᵀ H A_r) L = Σ_r A_rᵀ H w_r, A_r the (in, K) one-hot codes of row r.

    w (out, in), h (in, in), codes (out, in) int64, table (out,) table of each row, lut (T, K).
    Returns (levels (T, K) fp16-rounded and sorted, codes renumbered to match)."""
    out, inp = w.shape
    t, k = lut.shape
    hf = h.float()
    wh = w @ hf  # (out, in)
    gram_t, rhs_t = torch.zeros(t, k, k), torch.zeros(t, k)
    step = max(1, (1 << 22) // (inp * k))  # rows per chunk: the one-hot codes stay ≤ 16 MB
    for r0 in range(0, out, step):
        rows = slice(r0, min(r0 + step, out))
        onehot = torch.nn.functional.one_hot(codes[rows], k).float()  # (rows, in, K)
        n = onehot.shape[0]
        h_a = (hf @ onehot.permute(1, 0, 2).reshape(inp, n * k)).view(inp, n, k)  # H A_r for each row
        gram_t.index_add_(0, table[rows], torch.einsum("rik,irl->rkl", onehot, h_a))  # Σ A_rᵀ H A_r
        rhs_t.index_add_(0, table[rows], torch.einsum("rik,ri->rk", onehot, wh[rows]))  # Σ A_rᵀ H w_r
    ridge = 1e-6 * gram_t.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)  # unused levels keep their value
    gram_t = gram_t + torch.diag_embed(ridge[:, None].expand(t, k))
    rhs_t = rhs_t + ridge[:, None] * lut
    levels = torch.linalg.solve(gram_t.double(), rhs_t.double()).float().clamp(-65504, 65504).half().float()
    levels, order = levels.sort(1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(k).expand(t, k))  # old index -> new index
    return levels, rank[table].gather(1, codes)


def palettize(w: torch.Tensor, h: torch.Tensor | None, config: KMeansConfig) -> Palette:
    """Palettize (out, in) `w` given the (in, in) Hessian `h` (None: no calibration data)."""
    w = w.float()
    out, inp = w.shape
    importance = None
    if h is not None and config.sensitivity is Sensitivity.HESSIAN:
        importance = torch.diag(h).float()
    rows = config.rows if 0 < config.rows < out else 0
    lut = palette_tables(w, importance, config.bits, rows, config.iters)  # (T, K)
    table = torch.arange(out) // rows if rows else torch.zeros(out, dtype=torch.long)
    row_levels = lut[table]  # (out, K), sorted

    if h is None or not config.feedback:
        codes = nearest_level(w, row_levels)
    else:
        perm = torch.argsort(torch.diag(h), descending=True) if config.act_order else torch.arange(inp)
        u, dead = inverse_hessian_factor(h[perm][:, perm], config.damp)
        wp = w[:, perm].clone()
        wp[:, dead] = 0  # never-active channels: any value is free

        def quant(cols, first, uss):  # cols (out, 1): the nearest level of each row's table
            return row_levels.gather(1, nearest_level(cols, row_levels))

        for rnd in range(1 + config.refit):
            if rnd:  # levels refit to the codes by least squares, then the codes again with feedback
                lut, _ = refit_levels(w, h, codes, table, lut)
                row_levels = lut[table]
            qp = feedback_quantize(wp, u, 1, quant)
            q = torch.empty_like(qp)
            q[:, perm] = qp
            codes = nearest_level(q, row_levels)  # q holds table levels exactly: recovers the indices
        if config.refit:  # a last refit for the final codes
            lut, codes = refit_levels(w, h, codes, table, lut)
    return Palette.from_codes(codes.to(torch.uint8), lut, config.bits, rows)


def _check(config: KMeansConfig, shape: tuple[int, int]) -> None:
    check_keep_fits(config.keep, shape)


@register("kmeans", KMeansConfig, needs=("hessian",), check=_check)
def kmeans(weight, stats, config: KMeansConfig):
    """Non-uniform lookup tables per row group from sensitivity-weighted k-means, GPTQ feedback."""
    return with_kept_columns(weight.float(), stats.hessian, config.keep, lambda w, h: palettize(w, h, config))
