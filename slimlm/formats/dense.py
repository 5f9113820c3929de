"""`Dense`: a weight kept as it is, in fp32, fp16 or bf16 — the uncompressed baseline format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from slimlm.formats.base import register_format, stored_bits


@register_format
@dataclass(eq=False)
class Dense:
    format_name: ClassVar[str] = "dense"

    weight: torch.Tensor  # (out, in), stored dtype

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()

    def nbits(self) -> int:
        return stored_bits(self.weight)

    def to_state(self):
        return {}, {"weight": self.weight}

    @classmethod
    def from_state(cls, meta, tensors):
        return cls(weight=tensors["weight"])
