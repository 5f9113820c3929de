"""`LowRank`: a weight stored as the product of two thin factors, W ≈ U · V.

Layout of one (out, in) matrix of rank k:

    u  fp16 | bf16 | fp32[out, k]
    v  fp16 | bf16 | fp32[k, in]

    w = u · v, computed in float32.

It holds k·(out + in) values instead of out·in, so it is smaller only when
k < out·in / (out + in); the methods that build it keep a dense matrix otherwise.
`dequantize()` forms the product (the reference); a runtime can instead apply the two
factors in turn, which costs k·(out + in) multiply-adds per token instead of out·in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from slimlm.errors import SlimlmError
from slimlm.formats.base import register_format, stored_bits


def breakeven_rank(out_features: int, in_features: int) -> float:
    """The rank at which two factors hold as many values as the matrix: out·in / (out + in)."""
    return out_features * in_features / (out_features + in_features)


@register_format
@dataclass(eq=False)
class LowRank:
    format_name: ClassVar[str] = "lowrank"

    u: torch.Tensor  # (out, k)
    v: torch.Tensor  # (k, in)

    def __post_init__(self):
        if self.u.ndim != 2 or self.v.ndim != 2 or self.u.shape[1] != self.v.shape[0]:
            raise SlimlmError(f"low-rank factors have shapes {tuple(self.u.shape)} and {tuple(self.v.shape)}, "
                              "which do not multiply (corrupt file?)")
        if self.u.dtype != self.v.dtype:
            raise SlimlmError("low-rank factors must share one dtype (corrupt file?)")

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.u.shape[0], self.v.shape[1])

    def dequantize(self) -> torch.Tensor:
        return self.u.float() @ self.v.float()

    def nbits(self) -> int:
        return stored_bits(self.u) + stored_bits(self.v)

    def to_state(self):
        return {"rank": self.rank}, {"u": self.u, "v": self.v}

    @classmethod
    def from_state(cls, meta, tensors):
        try:
            return cls(u=tensors["u"], v=tensors["v"])
        except KeyError as e:
            raise SlimlmError(f"low-rank format entry lacks {e}; the file is corrupt") from None
