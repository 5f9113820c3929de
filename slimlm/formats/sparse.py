"""`Sparse`: the kept weights of a pruned matrix and where they are; the pruned ones cost no value bits.

Layout of one (out, in) matrix. Positions, one of:

    bitmask  index  uint8[ceil(out·in / 8)]      1 bit per weight, row-major, 1 = kept
                                                 (the little-endian stream of bitpack.py)
    N:M      index  uint8[ceil(out·in/m · b / 8)] per group of m consecutive weights of a row,
                                                 the rank of its kept set among the C(m, n)
                                                 n-subsets of 0..m-1 in lexicographic order,
                                                 b = ceil(log2 C(m, n)) bits
                                                 (2:4: 3 bits per 4 weights = 0.75 bits per weight;
                                                  4:8: 7 bits per 8 weights = 0.875)

Kept values, in row-major order of their positions (nnz of them), one of:

    plain      values  fp16 | bf16 | fp32[nnz]
    quantized  codes   uint8[ceil(nnz·bits / 8)]  bit-packed codes of the kept weights only
               scales  fp16[out, G]               the per-group parameters of an `IntQuant`
               mins    fp16[out, G]  (asymmetric) (G = ceil(in / group), groups over the
                                                   original columns, as in intq.py)

    w[r, c] = 0 where (r, c) is pruned; else the plain value, or the `IntQuant` arithmetic
    q · scale[r, c // group] + min[r, c // group]  (symmetric: (q − 2^(bits−1)) · scale).

A quantized `Sparse` comes from `absorb`: a quantization stage after pruning quantizes the
pruned dense matrix into an `IntQuant`; absorbing it keeps this mask and the codes of the
kept weights, so a 50 %-sparse 4-bit matrix stores 4·0.5 + 1 (mask) + scale bits per weight.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from slimlm.errors import SlimlmError
from slimlm.formats import bitpack
from slimlm.formats.base import register_format, stored_bits
from slimlm.formats.intq import IntQuant

VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ---- N:M position codes: rank of the kept subset of each group --------------------------------


@functools.lru_cache(maxsize=None)
def _subsets(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C(m,n), m) bool table of kept subsets in lexicographic order, and the inverse
    lookup from an m-bit pattern (bit j = position j kept) to its rank (−1: not n bits set)."""
    table = torch.zeros(math.comb(m, n), m, dtype=torch.bool)
    for i, combo in enumerate(itertools.combinations(range(m), n)):
        table[i, list(combo)] = True
    pattern = (table.long() << torch.arange(m)).sum(1)  # (C,)
    rank = torch.full((1 << m,), -1, dtype=torch.long)
    rank[pattern] = torch.arange(table.shape[0])
    return table, rank


def nm_code_bits(n: int, m: int) -> int:
    return max(1, math.ceil(math.log2(math.comb(m, n))))


def check_nm(n: int, m: int) -> None:
    if not (1 <= n < m <= 8):
        raise SlimlmError(f"N:M sparsity needs 1 ≤ N < M ≤ 8, got {n}:{m}")


def encode_nm(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Pack an (out, in) mask with exactly n kept in every group of m into rank codes."""
    out, inp = mask.shape
    groups = mask.reshape(-1, m).long()  # (out·in/m, m)
    _, rank = _subsets(n, m)
    codes = rank[(groups << torch.arange(m)).sum(1)]
    if (codes < 0).any():
        raise SlimlmError(f"the mask does not keep exactly {n} of every {m} weights")
    return bitpack.pack(codes, nm_code_bits(n, m))


def decode_nm(index: torch.Tensor, n: int, m: int, shape: tuple[int, int]) -> torch.Tensor:
    out, inp = shape
    n_groups = out * inp // m
    codes = bitpack.unpack(index, nm_code_bits(n, m), n_groups).long()
    table, _ = _subsets(n, m)
    if n_groups and int(codes.max()) >= table.shape[0]:
        raise SlimlmError(f"an N:M position code is out of range (corrupt file?)")
    return table[codes].reshape(out, inp)


# ---- the format --------------------------------------------------------------------------------


@register_format
@dataclass(eq=False)
class Sparse:
    format_name: ClassVar[str] = "sparse"

    out_features: int
    in_features: int
    n: int  # N:M pattern (n kept of every m); n = m = 0: bitmask
    m: int
    nnz: int  # kept weights
    index: torch.Tensor  # uint8, bitmask or N:M rank codes
    values: torch.Tensor | None = None  # plain kept values (nnz,)
    bits: int = 0  # quantized kept values: code width (0 = plain)
    group: int = 0
    codes: torch.Tensor | None = None  # uint8 packed (nnz codes)
    scales: torch.Tensor | None = None  # fp16 (out, G)
    mins: torch.Tensor | None = None  # fp16 (out, G), asymmetric only

    def __post_init__(self):
        size = self.out_features * self.in_features
        if self.m:
            check_nm(self.n, self.m)
            if self.in_features % self.m:
                raise SlimlmError(f"N:M sparse format: row length {self.in_features} is not a multiple of {self.m}")
            want = bitpack.packed_nbytes(size // self.m, nm_code_bits(self.n, self.m))
            if self.nnz != size // self.m * self.n:
                raise SlimlmError(f"N:M sparse format keeps {self.nnz} weights, {size // self.m * self.n} expected")
        else:
            want = bitpack.packed_nbytes(size, 1)
        if self.index.dtype != torch.uint8 or self.index.numel() != want:
            raise SlimlmError(f"sparse format index holds {self.index.numel()} bytes, {want} expected (corrupt file?)")
        if self.bits == 0:
            if self.values is None or self.values.numel() != self.nnz:
                raise SlimlmError(f"sparse format needs {self.nnz} kept values (corrupt file?)")
        else:
            g = -(-self.in_features // max(self.group, 1))
            ok = (self.codes is not None and self.codes.numel() == bitpack.packed_nbytes(self.nnz, self.bits)
                  and self.scales is not None and tuple(self.scales.shape) == (self.out_features, g)
                  and (self.mins is None or tuple(self.mins.shape) == (self.out_features, g)))
            if not ok or not 1 <= self.group <= self.in_features:
                raise SlimlmError("sparse format: quantized kept values have inconsistent codes or scales (corrupt file?)")

    @classmethod
    def from_dense(cls, w: torch.Tensor, mask: torch.Tensor, n: int = 0, m: int = 0,
                   dtype: torch.dtype = torch.float16) -> "Sparse":
        """Keep the entries of (out, in) `w` where `mask` is True, values stored in `dtype`."""
        out, inp = w.shape
        index = encode_nm(mask, n, m) if m else bitpack.pack(mask.reshape(-1), 1)
        vals = w[mask].to(dtype).contiguous()  # row-major order of the kept positions
        return cls(out, inp, n, m, int(mask.sum()), index, values=vals)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    def mask(self) -> torch.Tensor:
        """(out, in) bool, True where a weight is kept."""
        if self.m:
            return decode_nm(self.index, self.n, self.m, self.shape)
        size = self.out_features * self.in_features
        return bitpack.unpack(self.index, 1, size).bool().view(self.out_features, self.in_features)

    def kept_values(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The kept weights (nnz,) in float32, row-major order of their positions."""
        if not self.quantized:
            return self.values.float()
        mask = self.mask() if mask is None else mask
        rows, cols = mask.nonzero(as_tuple=True)
        q = bitpack.unpack(self.codes, self.bits, self.nnz).float()
        g = cols // self.group
        s = self.scales.float()[rows, g]
        if self.mins is None:
            return (q - float(1 << (self.bits - 1))) * s
        return q * s + self.mins.float()[rows, g]

    def dequantize(self) -> torch.Tensor:
        mask = self.mask()
        w = torch.zeros(self.out_features, self.in_features, dtype=torch.float32)
        w[mask] = self.kept_values(mask)
        return w

    def nbits(self) -> int:
        _, tensors = self.to_state()
        return sum(stored_bits(t) for t in tensors.values())

    def absorb(self, new):
        """Composition with a later stage (see slimlm.methods.registry): an `IntQuant` of the
        pruned matrix becomes this mask plus the codes of the kept weights only."""
        if isinstance(new, IntQuant) and new.shape == self.shape:
            mask = self.mask()
            kept = new.int_codes()[mask]  # (nnz,) in row-major order
            return Sparse(self.out_features, self.in_features, self.n, self.m, self.nnz, self.index,
                          bits=new.bits, group=new.group, codes=bitpack.pack(kept, new.bits),
                          scales=new.scales, mins=new.mins)
        return new  # another format (or a later pruning) replaces this one

    def to_state(self):
        meta = dict(out_features=self.out_features, in_features=self.in_features, n=self.n, m=self.m,
                    nnz=self.nnz, bits=self.bits, group=self.group)
        tensors = {"index": self.index}
        for key in ("values", "codes", "scales", "mins"):
            t = getattr(self, key)
            if t is not None:
                tensors[key] = t
        return meta, tensors

    @classmethod
    def from_state(cls, meta, tensors):
        try:
            return cls(**meta, **tensors)
        except TypeError as e:
            raise SlimlmError(f"sparse format entry is incomplete ({e}); the file is corrupt") from None
