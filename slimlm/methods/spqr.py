"""SpQR (Dettmers et al. 2023): GPTQ with small groups whose statistics are themselves
quantized, and a few sensitive weights kept exact in fp16.

Per layer (H ∝ XᵀX, U the upper Cholesky factor of the damped H⁻¹, as in GPTQ):

1. sensitivity: weight (r, c) rounded to ŵ adds (w − ŵ)² / U[c, c]² to the objective (the
   GPTQ view); the leave-one-out criterion asks how much a group's summed sensitivity
   drops when one weight is left out of the group's range (and kept exact). A pre-pass over
   the original weights sets both thresholds — on that reduction and on the per-weight
   sensitivity after it — at the quantiles that leave `outliers` × numel weights above;
2. first-level statistics: for each group of `group` input columns, each row gets an
   affine range (scale, min) from its weights without the leave-one-out candidates (with
   `clip`, shrunk to minimise the sensitivity-weighted error of the rest); the (out,)
   scales and minimums of a column group are then quantized to `stat_bits` in groups of
   `stat_group` rows with fp16 second-level scale and minimum — and the codes are chosen
   for the quantized statistics;
3. the GPTQ column loop (act-order with statistics from the original weights, or natural
   order with each group's statistics set when the loop reaches it): a weight whose
   sensitivity still exceeds the threshold becomes an outlier — stored in fp16, so almost
   no error flows on — while the budget of `outliers` × numel lasts.

Stored as `SpQRQuant`; bits per weight = bits + 2·stat_bits/group + 64/(group·stat_group)
+ 48 × outlier share. Defaults (group 16, 3-bit statistics in groups of 64 rows, at most
0.1 % outliers) cost bits + 0.4375 + ≤ 0.048: within bits + 0.5 all in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm.errors import SlimlmError
from slimlm.formats import bitpack
from slimlm.formats.intq import expand_groups, n_groups
from slimlm.formats.spqr import SpQRQuant, decode_affine
from slimlm.methods._hessian import gptq_columns, inverse_cholesky, validate_solver_options
from slimlm.methods.affine import _grouped, affine_params, check_group, quantize_codes
from slimlm.methods.registry import register

CLIP_GRID = 20  # range shrink factors 1, 0.975, ..., 0.5


@dataclass(frozen=True)
class SpQRConfig:
    SHOWN = ("bits",)
    bits: int = 3
    group: int = 16
    stat_bits: int = 3
    stat_group: int = 64
    outliers: float = 0.001  # most weights kept in fp16, as a share of the layer
    act_order: bool = True
    clip: bool = True
    damp: float = 0.01
    block: int = 128

    def __post_init__(self):
        if not (2 <= self.bits <= 8 and 2 <= self.stat_bits <= 8):
            raise SlimlmError(f"bits and stat_bits must be in 2..8, got {self.bits} and {self.stat_bits}")
        if self.group < 1 or self.stat_group < 1:
            raise SlimlmError(f"group and stat_group must be positive, got {self.group} and {self.stat_group}")
        if not 0 <= self.outliers <= 0.1:
            raise SlimlmError(f"outliers is a share of the weights in [0, 0.1], got {self.outliers}")
        validate_solver_options(self.damp, self.block)


@dataclass
class _Stats:
    """Quantized first-level statistics of some column groups."""

    scale: torch.Tensor  # (out, G) float32, decoded
    mins: torch.Tensor  # (out, G)
    scale_codes: torch.Tensor  # (G, out) uint8
    min_codes: torch.Tensor
    second: tuple  # (scale_scale, scale_min, min_scale, min_min), each (G, R) fp16-rounded float32


def _quantize_stats(v: torch.Tensor, stat_bits: int, stat_group: int):
    """Second level: (out, G) values -> (codes (G, out), scale (G, R), min (G, R), decoded (out, G))."""
    vt = v.T.contiguous()  # (G, out): groups of rows run along the last dimension
    s, m = affine_params(vt, stat_bits, stat_group, False)
    q = quantize_codes(vt, s, m, stat_bits, stat_group)
    return q, s, m, decode_affine(q, s, m, stat_group).T


def _range_error(wg, lo, hi, wt, maxq):
    """Σ wt·(w − ŵ)² per group for ranges lo..hi (out, G); wg (out, G, k), wt broadcastable to it."""
    s = ((hi - lo) / maxq).clamp(min=1e-12).unsqueeze(-1)
    q = torch.round((wg - lo.unsqueeze(-1)) / s).clamp(0, maxq)
    return ((q * s + lo.unsqueeze(-1) - wg) ** 2 * wt).sum(-1)


def loo_reduction(wg: torch.Tensor, hdg: torch.Tensor, valid: torch.Tensor, bits: int) -> torch.Tensor:
    """(out, G, k): how much a group's weighted rounding error Σ hd·(w − ŵ)² drops when weight i
    is left out of the group's range (and kept exact) — SpQR's leave-one-out criterion.
    wg (out, G, k) grouped weights, hdg (G, k) weights, valid (G, k) False on padding."""
    maxq = (1 << bits) - 1
    inf = torch.tensor(float("inf"))
    wt = hdg * valid

    def err(mask):  # mask (G, k): the weights that set the range and count
        lo = torch.where(mask, wg, inf).amin(-1)
        hi = torch.where(mask, wg, -inf).amax(-1)
        return _range_error(wg, lo, hi, wt * mask, maxq)

    base = err(valid)  # (out, G)
    red = torch.empty_like(wg)
    for i in range(wg.shape[-1]):
        m = valid.clone()
        m[:, i] = False
        red[..., i] = base - err(m)
    return torch.where(torch.isfinite(red) & valid, red, -inf)


def first_level_stats(w: torch.Tensor, group: int, hd: torch.Tensor, tau: float, bits: int,
                      stat_bits: int, stat_group: int, clip: bool = True) -> _Stats:
    """Statistics for the column groups of `w` (out, in): per-row min/max of the weights whose
    leave-one-out reduction is at most `tau` (the others are left to be outliers; with `clip`,
    each range is then shrunk to minimise the weighted error of the kept weights), then
    quantized (second level). hd (in,) = 1 / U[c, c]² weights each column's error."""
    maxq = (1 << bits) - 1
    inp = w.shape[1]
    wg = _grouped(w, group)  # (out, G, group)
    hdg = _grouped(hd.unsqueeze(0), group)[0]  # (G, group)
    valid = (torch.arange(wg.shape[1] * group) < inp).view(-1, group)  # (G, group): False on padding
    keep = valid.expand_as(wg)
    if tau != float("inf"):
        keep = keep & ~(loo_reduction(wg, hdg, valid, bits) > tau)
        keep = torch.where(keep.any(-1, keepdim=True), keep, valid.expand_as(wg))  # never an empty range
    inf = torch.tensor(float("inf"))
    lo = torch.where(keep, wg, inf).amin(-1)
    hi = torch.where(keep, wg, -inf).amax(-1)
    if clip:  # shrink each range to minimise the weighted error of the kept weights
        best, best_f = torch.full(lo.shape, float("inf")), torch.ones_like(lo)
        kept = hdg * keep  # (out, G, group)
        for k in range(CLIP_GRID + 1):
            f = 1.0 - 0.5 * k / CLIP_GRID
            e = _range_error(wg, lo * f, hi * f, kept, maxq)
            better = e < best
            best, best_f = torch.where(better, e, best), torch.where(better, f, best_f)
        lo, hi = lo * best_f, hi * best_f
    scale = (hi - lo) / maxq
    sc, ss, sm, s_dec = _quantize_stats(scale, stat_bits, stat_group)
    mc, ms, mm, m_dec = _quantize_stats(lo, stat_bits, stat_group)
    return _Stats(s_dec, m_dec, sc, mc, (ss, sm, ms, mm))


def _cat_stats(parts: list[_Stats]) -> _Stats:
    return _Stats(torch.cat([p.scale for p in parts], 1), torch.cat([p.mins for p in parts], 1),
                  torch.cat([p.scale_codes for p in parts], 0), torch.cat([p.min_codes for p in parts], 0),
                  tuple(torch.cat([p.second[i] for p in parts], 0) for i in range(4)))


def _round(w: torch.Tensor, s: torch.Tensor, m: torch.Tensor, bits: int):
    """Codes and decoded values of `w` under decoded statistics s, m (broadcastable)."""
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((w - m) / safe).clamp(0, (1 << bits) - 1)
    return q, q * s + m  # the arithmetic of decode_affine


def spqr_quantize(weight: torch.Tensor, hessian: torch.Tensor, cfg: SpQRConfig = SpQRConfig()) -> SpQRQuant:
    """SpQR of `weight` (out, in) under `hessian` (in, in) ∝ XᵀX (see the module docstring)."""
    w = weight.detach().float().clone()
    out, inp = w.shape
    group = check_group(cfg.group, inp)
    stat_group = min(cfg.stat_group, out)
    h = hessian.detach().to(torch.float64)
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if cfg.act_order else torch.arange(inp)
    u, _ = inverse_cholesky(h[perm][:, perm], cfg.damp)
    hd = torch.empty(inp)
    hd[perm] = 1.0 / u.diagonal() ** 2  # (in,) in the natural order

    budget = int(cfg.outliers * out * inp)
    tau_loo = tau = float("inf")
    if budget:  # thresholds from a pre-pass over the original weights, sized to the budget
        wg = _grouped(w, group)
        valid = (torch.arange(wg.shape[1] * group) < inp).view(-1, group)
        red = loo_reduction(wg, _grouped(hd.unsqueeze(0), group)[0], valid, cfg.bits).flatten()
        tau_loo = max(float(torch.topk(red, min(budget, red.numel())).values[-1]), 0.0)
        pre = first_level_stats(w, group, hd, tau_loo, cfg.bits, cfg.stat_bits, stat_group, cfg.clip)
        _, deq = _round(w, expand_groups(pre.scale, group, inp), expand_groups(pre.mins, group, inp), cfg.bits)
        sens = ((w - deq) ** 2 * hd).flatten()
        tau = float(torch.topk(sens, budget).values[-1])

    codes = torch.zeros(out, inp, dtype=torch.uint8)
    outlier_mask = torch.zeros(out, inp, dtype=torch.bool)
    outlier_val = torch.zeros(out, inp, dtype=torch.float16)
    left = [budget]
    order = perm.tolist()
    parts: list[_Stats] = []
    static = cfg.act_order or group >= inp
    cur = {}
    if static:
        st = pre if budget else first_level_stats(w, group, hd, tau_loo, cfg.bits, cfg.stat_bits, stat_group, cfg.clip)

    def quantize(j: int, cols: torch.Tensor) -> torch.Tensor:
        c = order[j]
        if static:
            g = c // group
            s, m = st.scale[:, g], st.mins[:, g]
        else:
            if j % group == 0:
                width = min(group, cols.shape[1])
                cur["st"] = first_level_stats(cols[:, :width], width, hd[j:j + width], tau_loo, cfg.bits,
                                              cfg.stat_bits, stat_group, cfg.clip)
                parts.append(cur["st"])
            s, m = cur["st"].scale[:, 0], cur["st"].mins[:, 0]
        col = cols[:, 0]
        q, deq = _round(col, s, m, cfg.bits)
        codes[:, c] = q.to(torch.uint8)
        if left[0] > 0:
            sens = (col - deq) ** 2 * hd[c]
            cand = torch.nonzero(sens > tau).flatten()
            if cand.numel():
                cand = cand[torch.argsort(sens[cand], descending=True)][:left[0]]
                left[0] -= cand.numel()
                outlier_mask[cand, c] = True
                outlier_val[cand, c] = col[cand].half()
                deq = deq.clone()
                deq[cand] = outlier_val[cand, c].float()
        return deq

    block = cfg.block if static else max(cfg.block // group, 1) * group
    gptq_columns(w[:, perm], u, quantize, block)
    if not static:
        st = _cat_stats(parts)
    idx = torch.nonzero(outlier_mask.flatten()).flatten()
    ss, sm, ms, mm = st.second
    return SpQRQuant(
        out_features=out, in_features=inp, bits=cfg.bits, group=group, stat_bits=cfg.stat_bits,
        stat_group=stat_group,
        codes=bitpack.pack(codes.flatten(), cfg.bits),
        scale_codes=bitpack.pack(st.scale_codes.flatten(), cfg.stat_bits),
        min_codes=bitpack.pack(st.min_codes.flatten(), cfg.stat_bits),
        scale_scale=ss.half(), scale_min=sm.half(), min_scale=ms.half(), min_min=mm.half(),
        outlier_idx=idx.to(torch.int32), outlier_val=outlier_val.flatten()[idx].contiguous(),
    )


def _check(config: SpQRConfig, shape: tuple[int, int]) -> None:
    check_group(config.group, shape[1])
    if n_groups(shape[1], config.group) * shape[0] == 0:
        raise SlimlmError(f"cannot quantize an empty layer of shape {shape}")


@register("spqr", SpQRConfig, needs=("hessian",), check=_check)
def spqr(weight, stats, config: SpQRConfig):
    """SpQR: GPTQ with 16-column groups, 3-bit statistics and fp16 outliers."""
    if stats.hessian is None:
        raise SlimlmError(f"spqr needs calibration statistics for {stats.name}; run it through the compression engine")
    return spqr_quantize(weight, stats.hessian, config)
