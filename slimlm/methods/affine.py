"""Affine (uniform) quantization primitives shared by RTN, GPTQ and friends.

Pure tensor functions, no model: per-group parameters from a weight matrix, codes for
given parameters, and the whole round-to-nearest quantizer. Parameters are rounded to
fp16 *before* codes are chosen, so the stored format reproduces exactly what the
codes were optimised for.
"""

from __future__ import annotations

import torch

from slimlm.errors import SlimlmError
from slimlm.formats.intq import IntQuant, expand_groups, n_groups

FP16_MAX = 65504.0


def validate_group_option(group: int) -> None:
    """A config's `group` option: a positive size, or 0 for per channel."""
    if group < 0:
        raise SlimlmError(f"group must be a positive size or 0 (per channel), got {group}")


def check_group(group: int, in_features: int) -> int:
    """The effective group size (0 = per channel), refused when it does not fit the row."""
    if group < 0:
        raise SlimlmError(f"group size must be positive (or 0 / 'channel' for per-channel), got {group}")
    if group == 0:
        return in_features
    if group > in_features:
        raise SlimlmError(f"group size {group} is larger than the row length {in_features}")
    return group


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """(out, in) -> (out, G, group), the last group padded by repeating its last column
    (padding by a value already in the group leaves its min, max and absmax unchanged)."""
    out, inp = w.shape
    g = n_groups(inp, group)
    pad = g * group - inp
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out, pad)], dim=1)
    return w.view(out, g, group)


def affine_params(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group (scale, min) of (out, in) weights, each (out, G), rounded to fp16 values.

    Asymmetric: levels min + k·scale, k in [0, 2^bits − 1] spanning [min, max].
    Symmetric: levels (k − 2^(bits−1))·scale with scale = absmax / (2^(bits−1) − 1).
    """
    wg = _grouped(w.float(), group)
    if symmetric:
        amax = wg.abs().amax(-1)
        scale = (amax / ((1 << (bits - 1)) - 1)).clamp(max=FP16_MAX)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale.half().float(), None
    lo, hi = wg.amin(-1).clamp(-FP16_MAX, FP16_MAX), wg.amax(-1).clamp(-FP16_MAX, FP16_MAX)
    scale = ((hi - lo) / ((1 << bits) - 1)).clamp(max=FP16_MAX).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: any scale, code 0
    return scale, lo.half().float()


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, bits: int, group: int) -> torch.Tensor:
    """Nearest codes (out, in) uint8 for weights `w` under per-group (out, G) parameters."""
    inp = w.shape[1]
    s = expand_groups(scale, group, inp)
    if mins is None:
        half = 1 << (bits - 1)
        q = torch.round(w / s).clamp(-half, half - 1) + half
    else:
        q = torch.round((w - expand_groups(mins, group, inp)) / s).clamp(0, (1 << bits) - 1)
    return q.to(torch.uint8)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, bits: int, group: int) -> torch.Tensor:
    """Float weights of codes `q` — the same arithmetic as `IntQuant.dequantize`."""
    inp = q.shape[1]
    s = expand_groups(scale, group, inp)
    if mins is None:
        return (q.float() - float(1 << (bits - 1))) * s
    return q.float() * s + expand_groups(mins, group, inp)


def quantize_rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool = False) -> IntQuant:
    """Round-to-nearest quantization of (out, in) `w` into an `IntQuant`."""
    group = check_group(group, w.shape[1])
    scale, mins = affine_params(w, bits, group, symmetric)
    q = quantize_codes(w.float(), scale, mins, bits, group)
    return IntQuant.from_codes(q, scale, mins, bits, group)
