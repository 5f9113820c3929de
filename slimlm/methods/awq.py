"""AWQ (Lin et al. 2023): activation-aware per-input-channel scaling before quantization.

Channels that carry large activations matter most; multiplying their weights by s > 1
before quantizing (and dividing the input by s) gives them a finer effective step:

    W x = (W·diag(s)) (x / s)  ≈  Q(W·diag(s)) (x / s)

For one layer, with H = mean xxᵀ (the engine's Hessian) and a = E[x²] per channel:

1. scale search: s = rms(x)^α / sqrt(max·min), α on a grid in [0, 1]; each candidate is
   scored by the layer's output error ‖(W − Q(W·s)/s) Xᵀ‖² / n = tr(D H Dᵀ) over all
   calibration tokens (α = 0 is plain quantization, so the search never loses to it);
2. clipping search (`clip`): each group's range shrunk by the factor that minimises that
   group's own output error dᵀ H_gg d (H's diagonal block for the group's columns);
3. the scaled weights quantized by RTN with those ranges, or (`quant=gptq`) by GPTQ under
   the Hessian of the scaled inputs, diag(1/s) H diag(1/s).

AWQ folds s into the norm or linear before the layer. The per-layer method contract
cannot change another layer, so s is stored explicitly in a `ScaledQuant` (16 bits per
input channel, counted: +16/out bits per weight, e.g. +0.028 for 576 outputs); when the
search picks α = 0 the plain `IntQuant` is returned with no scale at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from slimlm.errors import SlimlmError
from slimlm.formats.intq import IntQuant
from slimlm.formats.scaled import ScaledQuant
from slimlm.methods.affine import affine_params, check_group, FP16_MAX, quantize_codes, validate_group_option
from slimlm.methods.gptq import gptq_quantize
from slimlm.methods.registry import register
from slimlm.methods._hessian import validate_solver_options

MIN_SCALE = 1e-4  # fp16-representable with room; a scale never reaches zero


class AWQQuant(str, Enum):
    RTN = "rtn"
    GPTQ = "gptq"


@dataclass(frozen=True)
class AWQConfig:
    ALIASES = {"group": {"channel": 0}}
    SHOWN = ("bits", "group")
    bits: int = 4
    group: int = 64  # 0 = per channel
    grid: int = 20  # α in {0, 1/grid, ..., 1}
    clip: bool = True
    quant: AWQQuant = AWQQuant.RTN
    damp: float = 0.01  # GPTQ only
    act_order: bool = True  # GPTQ only

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise SlimlmError(f"bits must be in 2..8, got {self.bits}")
        validate_group_option(self.group)
        if not 1 <= self.grid <= 1000:
            raise SlimlmError(f"grid must be in 1..1000 steps, got {self.grid}")
        validate_solver_options(self.damp)
        object.__setattr__(self, "quant", AWQQuant(self.quant))


def _rtn_dequant(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    s, m = affine_params(w, bits, group, False)
    q = quantize_codes(w, s, m, bits, group)
    return IntQuant.from_codes(q, s, m, bits, group).dequantize()


def _output_error(d: torch.Tensor, h: torch.Tensor) -> float:
    """tr(D H Dᵀ) for D (out, in), H (in, in)."""
    return float(((d @ h) * d).sum())


def channel_scales(rms: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = rms^α normalised so max·min = 1, as fp16 (in,) clamped to a safe positive range."""
    s = rms.clamp(min=1e-8) ** alpha
    s = s / (s.max() * s.min()).sqrt()
    return s.clamp(MIN_SCALE, FP16_MAX).half()


def search_scale(w: torch.Tensor, h: torch.Tensor, act_norm: torch.Tensor, bits: int, group: int,
                 grid: int) -> tuple[float, torch.Tensor]:
    """(α, s fp16 (in,)) minimising the output error of plain rounding of W·diag(s)."""
    rms = act_norm.float().clamp(min=0).sqrt()
    best = (float("inf"), 0.0, None)
    for k in range(grid + 1):
        alpha = k / grid
        s = channel_scales(rms, alpha).float()
        d = w - _rtn_dequant(w * s, bits, group) / s
        err = _output_error(d, h)
        if err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2].half()


def output_clip_params(w: torch.Tensor, h: torch.Tensor, bits: int, group: int,
                       grid: int = 20, max_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (scale, min) (out, G), fp16-rounded, each group's range shrunk by the factor
    in [1 − max_shrink, 1] minimising its output error dᵀ H_gg d (d = w − ŵ over the group)."""
    out, inp = w.shape
    maxq = (1 << bits) - 1
    scales, mins = [], []
    for c0 in range(0, inp, group):
        wg = w[:, c0:c0 + group]  # (out, g)
        hg = h[c0:c0 + group, c0:c0 + group]  # (g, g)
        lo, hi = wg.amin(1, keepdim=True), wg.amax(1, keepdim=True)
        best = torch.full((out, 1), float("inf"))
        best_s, best_m = torch.ones(out, 1), lo.half().float()
        for k in range(grid + 1):
            f = 1.0 - max_shrink * k / grid
            s = ((hi - lo) * f / maxq).half().float()
            s = torch.where(s > 0, s, torch.ones_like(s))
            m = (lo * f).half().float()
            d = wg - (torch.round((wg - m) / s).clamp(0, maxq) * s + m)
            e = ((d @ hg) * d).sum(1, keepdim=True)
            better = e < best
            best, best_s, best_m = torch.where(better, e, best), torch.where(better, s, best_s), torch.where(better, m, best_m)
        scales.append(best_s)
        mins.append(best_m)
    return torch.cat(scales, 1), torch.cat(mins, 1)


def awq_quantize(weight: torch.Tensor, hessian: torch.Tensor, act_norm: torch.Tensor, cfg: AWQConfig = AWQConfig()):
    """AWQ of `weight` (out, in); returns a `ScaledQuant` (or an `IntQuant` when α = 0)."""
    w = weight.detach().float()
    group = check_group(cfg.group, w.shape[1])
    h = hessian.detach().float()
    alpha, s16 = search_scale(w, h, act_norm, cfg.bits, group, cfg.grid)
    s = s16.float()
    ws = w * s  # (out, in) the scaled weights
    hs = h / s.unsqueeze(0) / s.unsqueeze(1)  # Hessian of the scaled inputs x / s
    if cfg.quant is AWQQuant.GPTQ:
        inner = gptq_quantize(ws, hs.double(), cfg.bits, group, False, cfg.act_order, False, cfg.clip, cfg.damp)
    else:
        if cfg.clip:
            sc, mn = output_clip_params(ws, hs, cfg.bits, group)
        else:
            sc, mn = affine_params(ws, cfg.bits, group, False)
        inner = IntQuant.from_codes(quantize_codes(ws, sc, mn, cfg.bits, group), sc, mn, cfg.bits, group)
    if alpha == 0.0 and bool((s16 == 1).all()):
        return inner
    return ScaledQuant(inner=inner, scale=s16)


def _check(config: AWQConfig, shape: tuple[int, int]) -> None:
    check_group(config.group, shape[1])


@register("awq", AWQConfig, needs=("hessian", "act_norm"), check=_check)
def awq(weight, stats, config: AWQConfig):
    """AWQ: activation-aware per-input-channel scaling searched on the output error, then RTN or GPTQ."""
    if stats.hessian is None or stats.act_norm is None:
        raise SlimlmError(f"awq needs calibration statistics for {stats.name}; run it through the compression engine")
    return awq_quantize(weight, stats.hessian, stats.act_norm, config)
