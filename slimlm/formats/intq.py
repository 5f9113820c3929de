"""`IntQuant`: integer codes of 2–8 bits with per-group fp16 scales (and minimums).

Layout of one (out, in) matrix, groups running along the input dimension:

    codes   uint8[ceil(out·in·bits / 8)]   bit-packed stream (see bitpack.py), row-major
    scales  fp16[out, G]                   G = ceil(in / group); the last group of a row is
    mins    fp16[out, G]   (asymmetric)    shorter when `group` does not divide `in`

    asymmetric:  w[r, c] = q[r, c] · scale[r, c // group] + min[r, c // group]
    symmetric:   w[r, c] = (q[r, c] − 2^(bits−1)) · scale[r, c // group]

computed in float32. Per-channel quantization is `group == in`. The affine form with a
stored minimum is llama.cpp's Q4_1 form, so the embedded model's Q4_1 grid (blocks of
32) is reproduced exactly by 4-bit asymmetric groups of 32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from slimlm.errors import SlimlmError
from slimlm.formats import bitpack
from slimlm.formats.base import register_format, stored_bits


def n_groups(in_features: int, group: int) -> int:
    return -(-in_features // group)


def expand_groups(t: torch.Tensor, group: int, in_features: int) -> torch.Tensor:
    """(out, G) per-group values -> (out, in), the last group possibly shorter."""
    return t.repeat_interleave(group, dim=1)[:, :in_features]


@register_format
@dataclass(eq=False)
class IntQuant:
    format_name: ClassVar[str] = "int"

    out_features: int
    in_features: int
    bits: int
    group: int
    symmetric: bool
    codes: torch.Tensor  # uint8, packed
    scales: torch.Tensor  # fp16 (out, G)
    mins: torch.Tensor | None = None  # fp16 (out, G), asymmetric only

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise SlimlmError(f"integer format bits must be in 2..8, got {self.bits}")
        if not 1 <= self.group <= self.in_features:
            raise SlimlmError(f"group size {self.group} is outside 1..{self.in_features} (the row length)")
        g = n_groups(self.in_features, self.group)
        want = bitpack.packed_nbytes(self.out_features * self.in_features, self.bits)
        if self.codes.dtype != torch.uint8 or self.codes.numel() != want:
            raise SlimlmError(f"integer format codes hold {self.codes.numel()} bytes, {want} expected (corrupt file?)")
        if tuple(self.scales.shape) != (self.out_features, g):
            raise SlimlmError(f"integer format scales have shape {tuple(self.scales.shape)}, expected {(self.out_features, g)}")
        if self.symmetric != (self.mins is None):
            raise SlimlmError("integer format: an asymmetric layout needs mins, a symmetric one has none")
        if self.mins is not None and tuple(self.mins.shape) != (self.out_features, g):
            raise SlimlmError(f"integer format mins have shape {tuple(self.mins.shape)}, expected {(self.out_features, g)}")

    @classmethod
    def from_codes(cls, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, bits: int, group: int):
        """Build from unpacked integer codes q (out, in) in [0, 2^bits) and per-group parameters."""
        out, inp = q.shape
        return cls(
            out_features=out,
            in_features=inp,
            bits=bits,
            group=group,
            symmetric=mins is None,
            codes=bitpack.pack(q.reshape(-1), bits),
            scales=scales.to(torch.float16).contiguous(),
            mins=None if mins is None else mins.to(torch.float16).contiguous(),
        )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def int_codes(self) -> torch.Tensor:
        """The unpacked codes, (out, in) uint8."""
        n = self.out_features * self.in_features
        return bitpack.unpack(self.codes, self.bits, n).view(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        q = self.int_codes().to(torch.float32)
        s = expand_groups(self.scales.float(), self.group, self.in_features)
        if self.symmetric:
            return (q - float(1 << (self.bits - 1))) * s
        return q * s + expand_groups(self.mins.float(), self.group, self.in_features)

    def dequantize_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """`dequantize()[idx]` for row indices `idx` (k,), decoding only those rows when
        each row's codes fill whole bytes (in·bits divisible by 8), the whole matrix otherwise."""
        row_bits = self.in_features * self.bits
        if row_bits % 8:
            return self.dequantize()[idx]
        nb = row_bits // 8
        rows = self.codes.view(self.out_features, nb)[idx]  # (k, nb) bytes of the chosen rows
        q = bitpack.unpack(rows.reshape(-1), self.bits, idx.numel() * self.in_features)
        q = q.view(idx.numel(), self.in_features).to(torch.float32)
        s = expand_groups(self.scales[idx].float(), self.group, self.in_features)
        if self.symmetric:
            return (q - float(1 << (self.bits - 1))) * s
        return q * s + expand_groups(self.mins[idx].float(), self.group, self.in_features)

    def row_chunks(self, rows: int) -> list["IntQuant"]:
        """This matrix as IntQuants of `rows` (rounded down to a multiple of 8) consecutive rows
        each, the last one shorter: views of its codes, scales and minimums, nothing copied;
        stacked in order they are this matrix. Building a kernel chunk by chunk keeps the
        repacking's temporaries (int32 codes) to one chunk's size."""
        step = max(8, rows // 8 * 8)  # 8 rows of codes always fill whole bytes
        if self.out_features <= step:
            return [self]
        nb = step * self.in_features * self.bits // 8  # bytes of one chunk's codes
        out = []
        for i, r0 in enumerate(range(0, self.out_features, step)):
            r1 = min(r0 + step, self.out_features)
            codes = self.codes[i * nb: i * nb + bitpack.packed_nbytes((r1 - r0) * self.in_features, self.bits)]
            out.append(IntQuant(r1 - r0, self.in_features, self.bits, self.group, self.symmetric, codes,
                                self.scales[r0:r1], None if self.mins is None else self.mins[r0:r1]))
        return out

    def nbits(self) -> int:
        n = stored_bits(self.codes) + stored_bits(self.scales)
        return n + (stored_bits(self.mins) if self.mins is not None else 0)

    def to_state(self):
        meta = dict(out_features=self.out_features, in_features=self.in_features, bits=self.bits,
                    group=self.group, symmetric=self.symmetric)
        tensors = {"codes": self.codes, "scales": self.scales}
        if self.mins is not None:
            tensors["mins"] = self.mins
        return meta, tensors

    @classmethod
    def from_state(cls, meta, tensors):
        try:
            return cls(**meta, codes=tensors["codes"], scales=tensors["scales"], mins=tensors.get("mins"))
        except (KeyError, TypeError) as e:
            raise SlimlmError(f"integer format entry is incomplete ({e}); the file is corrupt") from None
