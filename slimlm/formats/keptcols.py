"""`KeptColumns`: a few input columns kept in fp16, the rest of the matrix in an inner format.

Some input channels of a layer carry activations orders of magnitude above the others
(the massive activations of MODEL-NOTES.md: E[x²] of one channel of block 28's
down_proj is ≈ 79,000× the median). Any coarse code of those columns' weights costs
more output error than the rest of the matrix together; storing them exactly is cheap
(16 bits per row per column: 0.01–0.03 bits per weight per column on the embedded model).

Layout of one (out, in) matrix with n kept columns:

    cols    int16[n]                 the kept input columns, ascending
    values  fp16[out, n]             their weights
    inner   any packed format        shape (out, in − n): the other columns, in ascending order

    w[:, cols] = values;  w[:, other columns] = inner.dequantize()      (float32)

Bits: the inner format's bits + 16·n + 16·out·n.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from slimlm.errors import SlimlmError
from slimlm.formats.base import format_class, register_format, stored_bits

_INNER = "inner."  # prefix of the inner format's tensors in the state


@register_format
@dataclass(eq=False)
class KeptColumns:
    format_name: ClassVar[str] = "keptcols"

    inner: object  # a Packed format of shape (out, in − n)
    cols: torch.Tensor  # int16 (n,), ascending
    values: torch.Tensor  # fp16 (out, n)

    def __post_init__(self):
        out, rest = self.inner.shape
        n = self.cols.numel()
        if self.cols.dtype != torch.int16 or self.cols.ndim != 1:
            raise SlimlmError(f"keptcols needs int16 column positions, got {self.cols.dtype} (corrupt file?)")
        if self.values.dtype != torch.float16 or tuple(self.values.shape) != (out, n):
            raise SlimlmError(f"keptcols values have shape {tuple(self.values.shape)} ({self.values.dtype}), "
                              f"expected fp16 ({out}, {n}) (corrupt file?)")
        c = self.cols.long()
        if n and (int(c.min()) < 0 or int(c.max()) >= rest + n or not bool((c[1:] > c[:-1]).all())):
            raise SlimlmError(f"keptcols positions must be ascending and inside 0..{rest + n - 1} (corrupt file?)")

    @classmethod
    def from_parts(cls, inner, cols: torch.Tensor, values: torch.Tensor) -> "KeptColumns":
        """`cols` (n,) any integer order; `values` (out, n) in the same order."""
        order = torch.argsort(cols)
        return cls(inner=inner, cols=cols[order].to(torch.int16).contiguous(),
                   values=values[:, order].to(torch.float16).contiguous())

    @property
    def shape(self) -> tuple[int, int]:
        out, rest = self.inner.shape
        return (out, rest + self.cols.numel())

    def other_columns(self) -> torch.Tensor:
        """(in − n,) the columns the inner format holds, ascending."""
        keep = torch.zeros(self.shape[1], dtype=torch.bool)
        keep[self.cols.long()] = True
        return (~keep).nonzero().flatten()

    def dequantize(self) -> torch.Tensor:
        w = torch.empty(self.shape)
        w[:, self.other_columns()] = self.inner.dequantize()
        w[:, self.cols.long()] = self.values.float()
        return w

    def nbits(self) -> int:
        return self.inner.nbits() + stored_bits(self.cols) + stored_bits(self.values)

    def to_state(self):
        inner_meta, inner_tensors = self.inner.to_state()
        meta = dict(inner_format=self.inner.format_name, inner=inner_meta)
        tensors = {"cols": self.cols, "values": self.values, **{_INNER + k: v for k, v in inner_tensors.items()}}
        return meta, tensors

    @classmethod
    def from_state(cls, meta, tensors):
        try:
            inner = format_class(meta["inner_format"]).from_state(
                meta["inner"], {k[len(_INNER):]: v for k, v in tensors.items() if k.startswith(_INNER)})
            return cls(inner=inner, cols=tensors["cols"], values=tensors["values"])
        except (KeyError, TypeError) as e:
            raise SlimlmError(f"keptcols format entry is incomplete ({e}); the file is corrupt") from None
