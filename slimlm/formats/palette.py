"""`Palette`: b-bit indices into lookup tables of 2^b fp16 levels (k-means palettization).

Layout of one (out, in) matrix, rows grouped `rows` at a time (0 = the whole tensor):

    codes  uint8[ceil(out·in·bits / 8)]   bit-packed stream (see bitpack.py), row-major
    lut    fp16[T, 2^bits]                T = ceil(out / rows); the last table may serve
                                          fewer rows when `rows` does not divide `out`

    w[r, c] = lut[r // rows, code[r, c]]          (float32)

Bits per weight = bits + 16·2^bits / (rows·in); every level of every table is counted
whether or not a code uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from slimlm.errors import SlimlmError
from slimlm.formats import bitpack
from slimlm.formats.base import register_format, stored_bits


def n_tables(out_features: int, rows: int) -> int:
    return -(-out_features // rows) if rows else 1


@register_format
@dataclass(eq=False)
class Palette:
    format_name: ClassVar[str] = "palette"

    out_features: int
    in_features: int
    bits: int
    rows: int  # rows per lookup table; 0 = one table for the whole matrix
    codes: torch.Tensor  # uint8, packed
    lut: torch.Tensor  # fp16 (T, 2^bits)

    def __post_init__(self):
        if not 1 <= self.bits <= 8:
            raise SlimlmError(f"palette bits must be in 1..8, got {self.bits}")
        if self.rows < 0:
            raise SlimlmError(f"palette rows per table must be ≥ 0 (0 = one table), got {self.rows}")
        want = bitpack.packed_nbytes(self.out_features * self.in_features, self.bits)
        if self.codes.dtype != torch.uint8 or self.codes.numel() != want:
            raise SlimlmError(f"palette codes hold {self.codes.numel()} bytes, {want} expected (corrupt file?)")
        lut_shape = (n_tables(self.out_features, self.rows), 1 << self.bits)
        if tuple(self.lut.shape) != lut_shape or self.lut.dtype != torch.float16:
            raise SlimlmError(f"palette lookup tables have shape {tuple(self.lut.shape)} ({self.lut.dtype}), "
                              f"expected fp16 {lut_shape} (corrupt file?)")

    @classmethod
    def from_codes(cls, codes: torch.Tensor, lut: torch.Tensor, bits: int, rows: int) -> "Palette":
        """Build from unpacked codes (out, in) in [0, 2^bits) and tables (T, 2^bits)."""
        out, inp = codes.shape
        return cls(out_features=out, in_features=inp, bits=bits, rows=rows,
                   codes=bitpack.pack(codes.reshape(-1), bits), lut=lut.to(torch.float16).contiguous())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def table_of_row(self) -> torch.Tensor:
        """(out,) index of the lookup table each row uses."""
        r = torch.arange(self.out_features)
        return r // self.rows if self.rows else torch.zeros_like(r)

    def int_codes(self) -> torch.Tensor:
        n = self.out_features * self.in_features
        return bitpack.unpack(self.codes, self.bits, n).view(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        lut = self.lut.float()[self.table_of_row()]  # (out, 2^bits)
        return lut.gather(1, self.int_codes().long())

    def nbits(self) -> int:
        return stored_bits(self.codes) + stored_bits(self.lut)

    def to_state(self):
        meta = dict(out_features=self.out_features, in_features=self.in_features, bits=self.bits, rows=self.rows)
        return meta, {"codes": self.codes, "lut": self.lut}

    @classmethod
    def from_state(cls, meta, tensors):
        try:
            return cls(**meta, codes=tensors["codes"], lut=tensors["lut"])
        except (KeyError, TypeError) as e:
            raise SlimlmError(f"palette format entry is incomplete ({e}); the file is corrupt") from None
