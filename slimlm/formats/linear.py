"""`CompressedLinear`: the nn.Module that holds one packed weight in place of an nn.Linear.

The forward pass computes with `packed.dequantize()` — the format's reference — cached
after the first call so repeated forwards cost one matmul, unless the format sets
`cache_decoded = False` (decode just before use, e.g. block-level decompression of an
entropy-coded format) or the module is built with `cache=False`. The packed
tensors are not registered as parameters or buffers: they are saved by
`slimlm.formats.store`, and the module's `state_dict` holds only the bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.formats.base import Packed, bits_per_weight


class CompressedLinear(nn.Module):
    def __init__(self, packed: Packed, bias: torch.Tensor | None = None, method: str = "", cache: bool | None = None):
        super().__init__()
        self.packed = packed
        self.out_features, self.in_features = packed.shape
        self.method = method
        self.cache = getattr(packed, "cache_decoded", True) if cache is None else cache
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._weight: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out, in) float32 weight."""
        if self._weight is not None:
            return self._weight
        w = self.packed.dequantize()
        if self.cache:
            self._weight = w
        return w

    def drop_cache(self) -> None:
        self._weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        p = self.packed
        return f"in={self.in_features}, out={self.out_features}, format={p.format_name}, bpw={bits_per_weight(p):.3f}"


def replace_linear(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at module path `name`; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
