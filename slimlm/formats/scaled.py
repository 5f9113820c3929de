"""`ScaledQuant`: an inner packed format of W·diag(s) plus the per-input-channel scale s.

AWQ quantizes the weights multiplied by a per-input-channel scale s (> 0). When s cannot
be folded into the operation that produces the layer's input (a norm or a linear before
it), it is stored here:

    inner   any packed format holding W' ≈ W·diag(s), shape (out, in)
    scale   fp16[in]                                     s, one per input channel

    w[r, c] = inner.dequantize()[r, c] / scale[c]        computed in float32

so `y = W x = W' (x / s)`: a kernel may run the inner format on x / s. Bits: the inner
format's bits plus 16 per input channel.
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
class ScaledQuant:
    format_name: ClassVar[str] = "scaled"

    inner: object  # a Packed format
    scale: torch.Tensor  # fp16 (in,)

    def __post_init__(self):
        out, inp = self.inner.shape
        if self.scale.dtype != torch.float16 or tuple(self.scale.shape) != (inp,):
            raise SlimlmError(f"scaled format needs an fp16 scale of shape ({inp},), got "
                              f"{self.scale.dtype} {tuple(self.scale.shape)} (corrupt file?)")
        if not (torch.isfinite(self.scale).all() and (self.scale > 0).all()):
            raise SlimlmError("scaled format: every input-channel scale must be a positive finite number (corrupt file?)")

    @property
    def shape(self) -> tuple[int, int]:
        return self.inner.shape

    def dequantize(self) -> torch.Tensor:
        return self.inner.dequantize() / self.scale.float()

    def nbits(self) -> int:
        return self.inner.nbits() + stored_bits(self.scale)

    def to_state(self):
        inner_meta, inner_tensors = self.inner.to_state()
        meta = dict(inner_format=self.inner.format_name, inner=inner_meta)
        tensors = {"scale": self.scale, **{_INNER + k: v for k, v in inner_tensors.items()}}
        return meta, tensors

    @classmethod
    def from_state(cls, meta, tensors):
        try:
            inner_cls = format_class(meta["inner_format"])
            inner = inner_cls.from_state(meta["inner"], {k[len(_INNER):]: v for k, v in tensors.items()
                                                         if k.startswith(_INNER)})
            return cls(inner=inner, scale=tensors["scale"])
        except (KeyError, TypeError) as e:
            raise SlimlmError(f"scaled format entry is incomplete ({e}); the file is corrupt") from None
