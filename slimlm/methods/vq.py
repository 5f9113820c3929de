"""Vector quantization (VPTQ-style, Liu et al. 2024; GPTVQ, van Baalen et al. 2024).

Each row is scaled by its RMS and cut into vectors of `dim` consecutive input weights;
each vector is replaced by the index of one of k codebook entries (k = 2^(bits·dim)
unless `k` is given, so `bits` is the index cost per weight):

1. codebook: k-means over the layer's normalised vectors, every coordinate weighted by
   its input channel's Hessian diagonal E[x²] times the row scale² (the error it causes
   in the output), on at most `max_points` sampled vectors;
2. indices: GPTQ's column loop, one vector (`dim` columns) at a time; each vector takes
   the entry minimising the exact second-order loss ‖(w − s·c)·U⁻¹‖² of its block
   (U: Cholesky factor of the inverse Hessian), and its error is pushed onto the columns
   not yet assigned. Vectors are visited in order of decreasing Hessian mass
   (`act_order`), which changes no stored bit;
3. codebook refit (`refit=n`, owner of the codebook only): the entries are refit by least
   squares in the Hessian metric for the indices just chosen (the exact minimiser of the
   layer loss over the codebook, by conjugate gradients); with n > 1 the indices are then
   chosen again with feedback and the entries refit again, n refits in all, the last one
   after the last assignment;
4. scales: each row's scale is refit by least squares in the Hessian metric;
5. outliers (`keep=n`): the n input columns of largest E[x²] — the massive-activation
   channels of MODEL-NOTES.md — are kept in fp16 and absorb the error of the coded
   columns they can cancel (`slimlm.methods._keep`); stored as `KeptColumns` around the
   `VectorQuant` of the other columns. Without it one coded column of block 28's
   down_proj (E[x²] ≈ 79,000× the median) takes the whole model from ×2.2 to ×50 the
   reference perplexity (benchmarks/lowbit.md).

Codebooks can be shared (`share=role`) by all layers of the same role
(`model.layers.*.mlp.up_proj`) in one compression run: the first such layer trains
and stores the codebook and counts its bits; later layers store indices and scales
only (see `slimlm.formats.vq`). `share=all` uses one codebook for every layer of the
run, `share=none` (the default) one per layer. A 4096 × 6 fp16 codebook is 393,216
bits — 1.2 bpw on one 576 × 576 matrix, 0.04 bpw over that role's 30 layers in the
embedded model.

    vq:bits=2                       2-bit indices, vectors of 4, k = 256 per layer, 2 columns kept
    vq:bits=2,dim=6,share=role      k = 4096, one codebook per role
    vq:bits=3,dim=2,codebook=int8
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from enum import Enum

import torch

from slimlm.errors import SlimlmError
from slimlm.formats.vq import MAX_INDEX_BITS, Codebook, VectorQuant, index_bits, remember
from slimlm.methods._keep import check_keep, check_keep_fits, with_kept_columns
from slimlm.methods._kmeans import assign_weighted, feedback_quantize, inverse_hessian_factor, weighted_kmeans
from slimlm.methods.registry import register

# What sweeps and the demo run (slimlm.fit.presets): the best measured recipes at 3 and 2 bits
# (benchmarks/lowbit.md), not one per bit width — dim 4 at 3 bits (4,096 entries) compressed
# for 21 minutes in the demo and scored worse than dim 3 with a refit codebook.
PRESETS = ("vq:bits=3,dim=3,codebook=int8,refit=1", "vq:bits=2+vq:bits=3,dim=2@*.v_proj")


class Share(str, Enum):
    ROLE = "role"  # one codebook per layer role (same name up to the block index)
    ALL = "all"  # one codebook for every layer of the run
    NONE = "none"  # one codebook per layer


class CodebookDtype(str, Enum):
    FP16 = "fp16"
    INT8 = "int8"  # int8 entries, one fp16 scale per coordinate


@dataclass(frozen=True)
class VQConfig:
    SHOWN = ("bits", "dim", "keep")
    bits: int = 2  # index bits per weight: k = 2^(bits·dim)
    dim: int = 4  # vector length along the input dimension
    k: int = 0  # codebook size; 0 = 2^(bits·dim)
    share: Share = Share.NONE
    codebook: CodebookDtype = CodebookDtype.FP16
    feedback: bool = True  # GPTQ error feedback while assigning
    act_order: bool = True  # visit vectors by decreasing Hessian mass
    damp: float = 0.01  # Hessian damping, fraction of the mean diagonal
    iters: int = 8  # Lloyd iterations
    max_points: int = 32768  # vectors sampled to train a codebook
    keep: int = 2  # input columns of largest E[x²] kept in fp16 (see slimlm.methods._keep)
    refit: int = 0  # least-squares codebook refits, each after an assignment (layers that own their codebook)

    def __post_init__(self):
        if not 1 <= self.dim <= 64:
            raise SlimlmError(f"dim (vector length) must be in 1..64, got {self.dim}")
        if self.k < 0 or (self.k == 0 and not 1 <= self.bits * self.dim <= 16):
            raise SlimlmError(f"bits·dim must be in 1..16 (a codebook of at most 65,536 entries), got "
                              f"{self.bits}·{self.dim}; or give the codebook size k")
        if index_bits(self.size) > MAX_INDEX_BITS or self.size < 2:
            raise SlimlmError(f"codebook size k must be in 2..2^{MAX_INDEX_BITS}, got {self.size}")
        if not 0 <= self.damp < 10:
            raise SlimlmError(f"damp must be a small non-negative fraction such as 0.01, got {self.damp}")
        check_keep(self.keep)
        if not 0 <= self.refit <= 10:
            raise SlimlmError(f"refit rounds must be in 0..10, got {self.refit}")
        if not 0 <= self.iters <= 1000 or self.max_points < 1:
            raise SlimlmError(f"iters must be in 0..1000 and max_points ≥ 1, got {self.iters} and {self.max_points}")

    @property
    def size(self) -> int:
        return self.k or 1 << (self.bits * self.dim)


# ---- codebooks shared across the layers of one run -----------------------------------------------


@dataclass(eq=False)
class _SharedBook:
    codebook: Codebook
    owner: "weakref.ref"  # the packed layer that stores the codebook
    seen: set = field(default_factory=set)  # layer names that use it


_SHARED: dict = {}  # (config, role) -> _SharedBook; see `_shared_book`


def role_of(name: str) -> str:
    """The layer name with its block index replaced: model.layers.3.mlp.up_proj -> model.layers.*.mlp.up_proj."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def _shared_book(stats, config: VQConfig):
    """The run's shared-codebook table and this layer's key in it (None: not shared).

    The engine runs one compression at a time, layers in model order. A new run is
    recognised when a layer name comes back under a key (the same model compressed
    again) or when the owner of the codebook has been freed (its model is gone); then
    the layer starts a new codebook. An engine-provided per-run dict `stats.shared`
    is used instead when present."""
    if config.share is Share.NONE:
        return None, None
    table = getattr(stats, "shared", None)
    table = _SHARED if table is None else table
    key = (config, "*" if config.share is Share.ALL else role_of(stats.name))
    entry = table.get(key)
    if entry is not None and (stats.name in entry.seen or entry.owner() is None):
        del table[key]
    return table, key


# ---- the algorithm -------------------------------------------------------------------------------


def _vectors(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(out, in) -> (out, V, dim), the last vector zero-padded."""
    out, inp = x.shape
    pad = -inp % dim
    return torch.cat([x, x.new_zeros(out, pad)], 1).view(out, -1, dim) if pad else x.view(out, -1, dim)


def train_codebook(x: torch.Tensor, imp: torch.Tensor, scales: torch.Tensor, config: VQConfig, seed: int) -> Codebook:
    """Weighted k-means over the normalised vectors of x (out, in); imp (in,) channel importance."""
    out, inp = x.shape
    pts = _vectors(x, config.dim).reshape(-1, config.dim)  # (out·V, dim)
    wts = _vectors(imp.expand(out, inp) * scales[:, None] ** 2, config.dim).reshape(-1, config.dim)  # pads weigh 0
    if pts.shape[0] > config.max_points:
        pick = torch.randperm(pts.shape[0], generator=torch.Generator().manual_seed(seed))[: config.max_points]
        pts, wts = pts[pick], wts[pick]
    c, _, _ = weighted_kmeans(pts, wts, config.size, config.iters, seed)
    return Codebook.from_float(c, config.codebook.value)


def _vector_order(h_diag: torch.Tensor, inp: int, dim: int, act_order: bool) -> torch.Tensor:
    """Column permutation visiting whole vectors by decreasing Hessian mass; a short last vector stays last."""
    n_full = inp // dim
    cols = torch.arange(n_full * dim).view(n_full, dim)
    if act_order and n_full > 1:
        cols = cols[torch.argsort(h_diag[: n_full * dim].view(n_full, dim).sum(1), descending=True, stable=True)]
    return torch.cat([cols.reshape(-1), torch.arange(n_full * dim, inp)])


def nearest_entry(x: torch.Tensor, c: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """argmin_j ‖x_i − c_j‖² for the rows of x (n, s) over entries c (k, s): (n,) int64.

    ‖c_j‖² − 2 x_i·c_j, one addmm per chunk of rows so that the (chunk, k) distances stay
    in cache: with k = 4096 this is ~5× faster than one (n, k) matrix (benchmarks/lowbit.md)."""
    n2, ct = (c * c).sum(1), c.T.contiguous()  # (k,), (s, k)
    best = torch.empty(x.shape[0], dtype=torch.long)
    for i in range(0, x.shape[0], chunk):
        best[i:i + chunk] = torch.addmm(n2, x[i:i + chunk], ct, alpha=-2).argmin(1)
    return best


def assign(w: torch.Tensor, h: torch.Tensor | None, scales: torch.Tensor, cb: torch.Tensor, config: VQConfig) -> torch.Tensor:
    """Indices (out, V) of codebook entries cb (k, dim) for w (out, in) with row scales (out,)."""
    out, inp = w.shape
    dim = config.dim
    if h is None or not config.feedback:
        x = _vectors(w / scales[:, None], dim).reshape(-1, dim)
        imp = torch.ones(inp) if h is None else torch.diag(h).float()
        wt = _vectors(imp.expand(out, inp), dim).reshape(-1, dim)
        return assign_weighted(x, wt, cb)[0].view(out, -1)
    perm = _vector_order(torch.diag(h), inp, dim, config.act_order)
    u, dead = inverse_hessian_factor(h[perm][:, perm], config.damp)
    wp = w[:, perm].clone()
    wp[:, dead] = 0  # never-active channels: any value is free
    idx = torch.empty(out, -(-inp // dim), dtype=torch.long)
    inv_s = 1 / scales[:, None]

    def quant(cols, first, uss):  # cols (out, s), s ≤ dim: one vector, the Hessian-optimal entry
        s = cols.shape[1]
        a = torch.linalg.solve_triangular(uss, torch.eye(s), upper=True)  # U_ss⁻¹ (s, s)
        best = nearest_entry((cols * inv_s) @ a, cb[:, :s] @ a)  # Euclidean after the map by U_ss⁻¹
        idx[:, perm[first].item() // dim] = best
        return cb[best, :s] * scales[:, None]

    feedback_quantize(wp, u, dim, quant, block=max(dim, 128 // dim * dim))
    return idx


def refit_scales(w: torch.Tensor, h: torch.Tensor | None, q_unit: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per-row s minimising (w − s·q̂) H (w − s·q̂)ᵀ, fp16-rounded; the old scale where that is degenerate."""
    qh = q_unit if h is None else q_unit @ h.float()  # (out, in)
    num, den = (w * qh).sum(1), (q_unit * qh).sum(1)
    s = torch.where(den > 0, num / den.clamp_min(1e-30), scales).clamp(-65504, 65504).half().float()
    return torch.where(s != 0, s, scales)


def refit_codebook(w: torch.Tensor, h: torch.Tensor | None, idx: torch.Tensor, scales: torch.Tensor,
                   cb: torch.Tensor, iters: int = 64, tol: float = 1e-5) -> torch.Tensor:
    """Entries C (k, dim) minimising tr((W − Q) H (W − Q)ᵀ), Q[r, v·dim + t] = s_r·C[idx[r, v], t].

    The loss is quadratic in C: its normal equations A(C) = B, with A(C) = Gᵀ(G(C)·H) and
    B = Gᵀ(W·H), G the map entries -> (out, in) matrix and Gᵀ its adjoint (scale, then
    sum by index), are solved by conjugate gradients from the current entries: one
    (out, in) @ (in, in) product per step, no (k·dim)² matrix. Entries no vector uses
    stay where they are. w (out, in), h (in, in) or None (identity), idx (out, V), scales (out,)."""
    out, inp = w.shape
    k, dim = cb.shape
    flat = idx.reshape(-1)
    hf = None if h is None else h.float()

    def spread(c):  # (k, dim) -> (out, in)
        return c[idx].reshape(out, -1)[:, :inp] * scales[:, None]

    def gather(m):  # (out, in) -> (k, dim), the adjoint of spread
        m = _vectors(m * scales[:, None], dim).reshape(-1, dim)
        return torch.zeros(k, dim, dtype=m.dtype).index_add_(0, flat, m)

    def apply(c):
        q = spread(c)
        return gather(q if hf is None else q @ hf)

    c = cb.double()
    b = gather(w if hf is None else w @ hf).double()
    r = b - apply(c.float()).double()
    p, rr = r.clone(), float((r * r).sum())
    stop = tol ** 2 * float((b * b).sum())
    for _ in range(iters):
        if rr <= stop:
            break
        ap = apply(p.float()).double()
        pap = float((p * ap).sum())
        if pap <= 0:
            break
        alpha = rr / pap
        c += alpha * p
        r -= alpha * ap
        rr, rr_old = float((r * r).sum()), rr
        p = r + (rr / rr_old) * p
    return c.float()


def vector_quantize(w: torch.Tensor, h: torch.Tensor | None, config: VQConfig, seed: int = 0,
                    codebook: Codebook | None = None) -> VectorQuant:
    """Vector-quantize (out, in) `w` given its (in, in) Hessian `h` (None: plain weighted k-means).

    With `codebook` given (a shared one) it is used as is and not stored by this layer."""
    w = w.float()
    out, inp = w.shape
    scales = w.pow(2).mean(1).sqrt().clamp(min=1e-8, max=65504).half().float()  # (out,) row RMS
    if codebook is None:
        imp = torch.ones(inp) if h is None else torch.diag(h).float().clamp_min(0)
        book, owner = remember(train_codebook(w / scales[:, None], imp, scales, config, seed)), True
    else:
        book, owner = codebook, False
    cb = book.decoded()  # (k, dim)
    idx = assign(w, h, scales, cb, config)
    for rnd in range(config.refit if owner else 0):  # entries refit to the indices, the indices chosen again
        book = remember(Codebook.from_float(refit_codebook(w, h, idx, scales, cb), config.codebook.value))
        cb = book.decoded()
        if rnd < config.refit - 1:
            idx = assign(w, h, scales, cb, config)
    q_unit = cb[idx].reshape(out, -1)[:, :inp]  # (out, in) before row scaling
    scales = refit_scales(w, h, q_unit, scales)
    return VectorQuant.from_indices(idx, scales, book, inp, owner=owner)


def _check(config: VQConfig, shape: tuple[int, int]) -> None:
    check_keep_fits(config.keep, shape)
    n_vec = shape[0] * -(-(shape[1] - config.keep) // config.dim)
    if config.share is Share.NONE and config.size > n_vec:
        raise SlimlmError(f"a per-layer codebook of {config.size} entries exceeds the layer's "
                          f"{n_vec} vectors; lower bits or dim, or share codebooks")


@register("vq", VQConfig, needs=("hessian",), check=_check)
def vq(weight, stats, config: VQConfig):
    """Vectors of `dim` weights -> indices into a (shared) Hessian-weighted k-means codebook, GPTQ feedback."""
    table, key = _shared_book(stats, config)
    entry = table.get(key) if table is not None else None
    book = entry.codebook if entry else None
    packed = with_kept_columns(weight.float(), stats.hessian, config.keep,
                               lambda w, h: vector_quantize(w, h, config, stats.seed, book))
    if table is not None:
        if entry is None:
            inner = getattr(packed, "inner", packed)  # the VectorQuant that owns the codebook
            entry = table[key] = _SharedBook(inner.codebook, weakref.ref(inner))
        entry.seen.add(stats.name)
    return packed
