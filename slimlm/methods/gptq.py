"""GPTQ (Frantar et al. 2022): quantize a layer column by column, each column's rounding
error fed back into the columns not yet quantized through the inverse Hessian.

For one layer the objective is ‖(W − Ŵ) Xᵀ‖² with H = 2XᵀX/n (the engine's mean XᵀX).
With U the upper Cholesky factor of the damped H⁻¹, quantizing column j to q moves every
later column k by −(w_j − q_j)/U[j,j] · U[j,k] (see `_hessian.gptq_columns`).

Options:
  bits, group, sym   the integer grid, stored as the plain `IntQuant` layout
  act_order          process columns by descending diag(H) (the channels the model leans on
                     first, while many columns are still free to absorb their error); group
                     parameters are then *static* — set from the original weights in the
                     natural column order — so codes and groups keep the plain layout
  static             static groups without act-order (default: a group's parameters are set
                     when the loop reaches it, from weights that already carry feedback)
  clip               choose each group's range by a search that clips it to minimise the
                     diag(H)-weighted rounding error (instead of plain min/max)
  damp               dampening, a fraction of the mean diagonal of H (grown on failure)
  block              lazy-batch width (columns updated together)

Bits per weight = bits + 16·(2 if asymmetric else 1) / group, like RTN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm.errors import SlimlmError
from slimlm.formats.intq import IntQuant
from slimlm.methods._hessian import gptq_columns, inverse_cholesky, static_group_quantizer, validate_solver_options, weighted_clip_params
from slimlm.methods.affine import affine_params, check_group, dequantize_codes, quantize_codes, validate_group_option
from slimlm.methods.registry import register


@dataclass(frozen=True)
class GPTQConfig:
    ALIASES = {"group": {"channel": 0}}
    SHOWN = ("bits", "group")
    bits: int = 4
    group: int = 64  # 0 = per channel
    sym: bool = False
    act_order: bool = True
    static: bool = False  # static groups without act-order (act-order always uses static groups)
    clip: bool = True
    damp: float = 0.01
    block: int = 128

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise SlimlmError(f"bits must be in 2..8, got {self.bits}")
        validate_group_option(self.group)
        validate_solver_options(self.damp, self.block)


def group_params(w: torch.Tensor, bits: int, group: int, sym: bool, clip: bool,
                 importance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group (scale, min) of `w` (out, in): min/max, or (asymmetric, `clip`) the range
    clipped to minimise the `importance`-weighted (in,) rounding error."""
    if clip and not sym:
        return weighted_clip_params(w, bits, group, importance)
    return affine_params(w, bits, group, sym)


def _dynamic_quantizer(bits: int, group: int, sym: bool, clip: bool, importance: torch.Tensor,
                       codes: torch.Tensor, scales: list, mins: list):
    """Natural column order; a group's parameters come from its columns as the loop reaches
    them (they already carry the feedback of earlier groups)."""
    state = {}

    def quantize(j: int, cols: torch.Tensor) -> torch.Tensor:
        if j % group == 0:
            width = min(group, cols.shape[1])
            s, m = group_params(cols[:, :width], bits, width, sym, clip, importance[j:j + width])
            state["s"], state["m"] = s, m
            scales.append(s)
            mins.append(m)
        s, m = state["s"], state["m"]
        q = quantize_codes(cols[:, :1], s, m, bits, 1)
        codes[:, j] = q[:, 0]
        return dequantize_codes(q, s, m, bits, 1)[:, 0]

    return quantize


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group: int = 64, sym: bool = False,
                  act_order: bool = True, static: bool = False, clip: bool = True, damp: float = 0.01,
                  block: int = 128) -> IntQuant:
    """GPTQ of `weight` (out, in) under `hessian` (in, in) ∝ XᵀX into an `IntQuant`.

    Pure function (no model); also the second half of AWQ+GPTQ. Dead input channels (zero
    diagonal) are rounded without feedback; an ill-conditioned H gets more damping."""
    w = weight.detach().float()
    out, inp = w.shape
    group = check_group(group, inp)
    h = hessian.detach().to(torch.float64)
    importance = h.diagonal().float().clamp(min=0)  # (in,) E[x_c²]
    codes = torch.empty(out, inp, dtype=torch.uint8)
    if act_order or static or group >= inp:
        scale, mins = group_params(w, bits, group, sym, clip, importance)
        perm = torch.argsort(importance, descending=True, stable=True) if act_order else None
        if perm is not None:
            h = h[perm][:, perm]
            w = w[:, perm]
        u, _ = inverse_cholesky(h, damp)
        gptq_columns(w, u, static_group_quantizer(scale, mins, bits, group, perm, codes), block)
        return IntQuant.from_codes(codes, scale, mins, bits, group)
    u, _ = inverse_cholesky(h, damp)
    block = max(block // group, 1) * group  # groups never straddle a lazy block
    scales, mins_l = [], []
    gptq_columns(w, u, _dynamic_quantizer(bits, group, sym, clip, importance, codes, scales, mins_l), block)
    scale = torch.cat(scales, 1)
    mins = None if sym else torch.cat(mins_l, 1)
    return IntQuant.from_codes(codes, scale, mins, bits, group)


def _check(config: GPTQConfig, shape: tuple[int, int]) -> None:
    check_group(config.group, shape[1])


@register("gptq", GPTQConfig, needs=("hessian",), check=_check)
def gptq(weight, stats, config: GPTQConfig):
    """GPTQ: Hessian-aware rounding with error feedback; act-order with static groups."""
    if stats.hessian is None:
        raise SlimlmError(f"gptq needs calibration statistics for {stats.name}; run it through the compression engine")
    return gptq_quantize(weight, stats.hessian, config.bits, config.group, config.sym, config.act_order,
                         config.static, config.clip, config.damp, config.block)
