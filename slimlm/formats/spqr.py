"""`SpQRQuant`: small-group integer codes whose group statistics are themselves quantized,
plus a sparse set of fp16 outliers (SpQR, Dettmers et al. 2023).

Layout of one (out, in) matrix, first-level groups of `group` consecutive input columns
(G = ceil(in / group), the last group possibly shorter), second-level groups of
`stat_group` consecutive rows (R = ceil(out / stat_group), the last possibly shorter):

    codes        uint8[ceil(out·in·bits / 8)]        bit-packed, row-major (see bitpack.py)
    scale_codes  uint8[ceil(G·out·stat_bits / 8)]    first-level scales as codes, (G, out) row-major
    min_codes    uint8[ceil(G·out·stat_bits / 8)]    first-level minimums as codes, (G, out)
    scale_scale, scale_min   fp16[G, R]              second level of the scales
    min_scale,   min_min     fp16[G, R]              second level of the minimums
    outlier_idx  int32[k]                            flat positions r·in + c, ascending
    outlier_val  fp16[k]                             their values

    scale[g, r] = scale_codes[g, r] · scale_scale[g, r // stat_group] + scale_min[g, r // stat_group]
    min[g, r]   = min_codes[g, r]   · min_scale[g, r // stat_group]   + min_min[g, r // stat_group]
    w[r, c]     = codes[r, c] · scale[c // group, r] + min[c // group, r]     (float32)
    w[outliers] = outlier_val                          (the code stored there is ignored)

Bits: every stored tensor above, i.e. bits + 2·stat_bits/group + 64/(group·stat_group)
per weight, plus 48 per outlier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from slimlm.errors import SlimlmError
from slimlm.formats import bitpack
from slimlm.formats.base import register_format, stored_bits
from slimlm.formats.intq import expand_groups, n_groups


def decode_affine(q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, group: int) -> torch.Tensor:
    """q (rows, cols) codes · per-group (rows, ceil(cols/group)) scale + min, in float32 — the
    arithmetic of both levels (and what SpQR's quantizer must reproduce exactly)."""
    cols = q.shape[1]
    return q.float() * expand_groups(scale.float(), group, cols) + expand_groups(mins.float(), group, cols)


@register_format
@dataclass(eq=False)
class SpQRQuant:
    format_name: ClassVar[str] = "spqr"

    out_features: int
    in_features: int
    bits: int
    group: int
    stat_bits: int
    stat_group: int
    codes: torch.Tensor
    scale_codes: torch.Tensor
    min_codes: torch.Tensor
    scale_scale: torch.Tensor
    scale_min: torch.Tensor
    min_scale: torch.Tensor
    min_min: torch.Tensor
    outlier_idx: torch.Tensor
    outlier_val: torch.Tensor

    def __post_init__(self):
        out, inp = self.out_features, self.in_features
        if not (2 <= self.bits <= 8 and 2 <= self.stat_bits <= 8):
            raise SlimlmError(f"spqr format bits must be in 2..8, got {self.bits} and {self.stat_bits}")
        if not (1 <= self.group <= inp and 1 <= self.stat_group <= out):
            raise SlimlmError(f"spqr format groups {self.group}/{self.stat_group} do not fit shape {(out, inp)}")
        g, r = n_groups(inp, self.group), n_groups(out, self.stat_group)
        expect = {
            "codes": (torch.uint8, (bitpack.packed_nbytes(out * inp, self.bits),)),
            "scale_codes": (torch.uint8, (bitpack.packed_nbytes(g * out, self.stat_bits),)),
            "min_codes": (torch.uint8, (bitpack.packed_nbytes(g * out, self.stat_bits),)),
            "scale_scale": (torch.float16, (g, r)),
            "scale_min": (torch.float16, (g, r)),
            "min_scale": (torch.float16, (g, r)),
            "min_min": (torch.float16, (g, r)),
        }
        for name, (dtype, shape) in expect.items():
            t = getattr(self, name)
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise SlimlmError(f"spqr format {name} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape} (corrupt file?)")
        k = self.outlier_idx.numel()
        if (self.outlier_idx.dtype != torch.int32 or self.outlier_val.dtype != torch.float16
                or self.outlier_idx.ndim != 1 or tuple(self.outlier_val.shape) != (k,)):
            raise SlimlmError("spqr format outliers need int32 positions and as many fp16 values (corrupt file?)")
        if k and (int(self.outlier_idx.min()) < 0 or int(self.outlier_idx.max()) >= out * inp):
            raise SlimlmError("spqr format outlier positions fall outside the matrix (corrupt file?)")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first-level (scale, min), each (out, G) float32."""
        g = n_groups(self.in_features, self.group)
        n = g * self.out_features
        sq = bitpack.unpack(self.scale_codes, self.stat_bits, n).view(g, self.out_features)
        mq = bitpack.unpack(self.min_codes, self.stat_bits, n).view(g, self.out_features)
        s = decode_affine(sq, self.scale_scale, self.scale_min, self.stat_group)  # (G, out)
        m = decode_affine(mq, self.min_scale, self.min_min, self.stat_group)
        return s.T.contiguous(), m.T.contiguous()

    def int_codes(self) -> torch.Tensor:
        n = self.out_features * self.in_features
        return bitpack.unpack(self.codes, self.bits, n).view(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        s, m = self.stats()
        w = decode_affine(self.int_codes(), s, m, self.group)
        w.view(-1)[self.outlier_idx.long()] = self.outlier_val.float()
        return w

    def n_outliers(self) -> int:
        return self.outlier_idx.numel()

    def nbits(self) -> int:
        _, tensors = self.to_state()
        return sum(stored_bits(t) for t in tensors.values())

    def to_state(self):
        meta = dict(out_features=self.out_features, in_features=self.in_features, bits=self.bits,
                    group=self.group, stat_bits=self.stat_bits, stat_group=self.stat_group)
        names = ("codes", "scale_codes", "min_codes", "scale_scale", "scale_min", "min_scale", "min_min",
                 "outlier_idx", "outlier_val")
        return meta, {n: getattr(self, n) for n in names}

    @classmethod
    def from_state(cls, meta, tensors):
        try:
            return cls(**meta, **tensors)
        except TypeError as e:
            raise SlimlmError(f"spqr format entry is incomplete ({e}); the file is corrupt") from None
