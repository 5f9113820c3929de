"""`CompressedLinear`: the nn.Module that holds one packed weight in place of an nn.Linear.

The forward pass computes with `packed.dequantize()` — the format's reference — cached
after the first call so repeated forwards cost one matmul, unless the format sets
`cache_decoded = False` (decode just before use, e.g. block-level decompression of an
entropy-coded format) or the module is built with `cache=False`. The packed
tensors are not registered as parameters or buffers: they are saved by
`slimlm.formats.store`, and the module's `state_dict` holds only the bias.

Kernel choice (`Kernel`, explicit, the reference always available):
- `reference`: the path above, dequantize (cached) + matmul;
- `cpu`: the C kernels of `slimlm.kernels` compute straight from the packed codes for
  every batch size (nothing dequantized is cached), for formats they serve;
- `auto`: the C kernel for small batches (decoding, ≤ 16 rows) when one serves the
  format and the extension is built, the reference path otherwise.
Layers are built with `reference` (bit-for-bit what compression and evaluation
measured); the runtime (`slimlm.runtime`) switches a model it runs to `auto`.
A format no kernel serves, or a machine where the extension did not build, always runs
the reference path (the latter with one warning).
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.formats.base import Packed, bits_per_weight


class Kernel(str, Enum):
    REFERENCE = "reference"
    CPU = "cpu"
    AUTO = "auto"


SMALL_BATCH = 16  # rows at or below which `auto` uses the matrix-vector kernel


class CompressedLinear(nn.Module):
    def __init__(self, packed: Packed, bias: torch.Tensor | None = None, method: str = "", cache: bool | None = None,
                 kernel: Kernel | str = Kernel.REFERENCE):
        super().__init__()
        self.packed = packed
        self.kernel = Kernel(kernel)
        self._op = None  # the C operator, built on first use (repacking costs a pass over the codes)
        self._op_tried = False
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
        with torch.inference_mode(False):  # a cache filled under inference mode must serve forwards with autograd on
            w = self.packed.dequantize()
        if self.cache:
            self._weight = w
        return w

    def drop_cache(self) -> None:
        self._weight = None

    def set_kernel(self, kernel: Kernel | str) -> "CompressedLinear":
        self.kernel = Kernel(kernel)
        return self

    def kernel_op(self):
        """The C operator x -> x @ W.T serving this layer's format, or None (reference path)."""
        if self.kernel is Kernel.REFERENCE:
            return None
        if not self._op_tried:
            from slimlm.kernels import kernel_for

            self._op, self._op_tried = kernel_for(self.packed), True
        return self._op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not Kernel.REFERENCE:
            rows = x.numel() // self.in_features
            op = self.kernel_op() if self.kernel is Kernel.CPU or rows <= SMALL_BATCH else None
            if op is not None:
                y = op(x)
                return y if self.bias is None else y + self.bias.to(y.dtype)
        w = self.weight
        return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        p = self.packed
        return (f"in={self.in_features}, out={self.out_features}, format={p.format_name}, "
                f"bpw={bits_per_weight(p):.3f}, kernel={self.kernel.value}")


def replace_linear(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at module path `name`; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def set_kernel(model: nn.Module, kernel: Kernel | str) -> int:
    """Set the kernel choice of every CompressedLinear in `model`; returns how many there are."""
    mods = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    for m in mods:
        m.set_kernel(kernel)
    return len(mods)
