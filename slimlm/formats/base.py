"""The packed-format contract and the format registry.

A packed format holds one weight matrix of shape (out_features, in_features) in
compressed form. Every format:

- `dequantize() -> Tensor`: the exact float32 weights the model computes with; this
  is the spec every fast kernel is tested against;
- `nbits() -> int`: every stored bit (codes, scales, zeros, codebooks, indices,
  outlier values and positions, masks, entropy-coder tables) — never an under-count;
- `to_state() -> (meta, tensors)` and `from_state(meta, tensors)`: JSON-able metadata
  plus named tensors, the only way a format reaches disk (safetensors, never pickle).
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch

from slimlm.errors import SlimlmError


@runtime_checkable
class Packed(Protocol):
    format_name: ClassVar[str]

    @property
    def shape(self) -> tuple[int, int]: ...

    def dequantize(self) -> torch.Tensor: ...

    def nbits(self) -> int: ...

    def to_state(self) -> tuple[dict, dict[str, torch.Tensor]]: ...

    @classmethod
    def from_state(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "Packed": ...


FORMATS: dict[str, type] = {}


def register_format(cls):
    """Class decorator: make a packed format loadable by its `format_name`."""
    name = cls.format_name
    if name in FORMATS:
        raise ValueError(f"packed format {name!r} registered twice")
    FORMATS[name] = cls
    return cls


def load_all_formats() -> dict[str, type]:
    """Import every format module of this package (each registers itself), so a saved model
    finds its format whatever code ran before."""
    import importlib
    import pkgutil

    import slimlm.formats as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_") and mod.name not in ("base", "store", "linear", "bitpack"):
            importlib.import_module(f"slimlm.formats.{mod.name}")
    return FORMATS


def format_class(name: str) -> type:
    if name not in FORMATS:
        load_all_formats()
    try:
        return FORMATS[name]
    except KeyError:
        raise SlimlmError(f"unknown packed format {name!r} (known: {', '.join(sorted(FORMATS))}); "
                          "was the model saved by a newer slimlm?") from None


def bits_per_weight(p: Packed) -> float:
    out, inp = p.shape
    return p.nbits() / (out * inp)


def stored_bits(t: torch.Tensor) -> int:
    """Bits a tensor occupies when stored: elements × element size."""
    return t.numel() * t.element_size() * 8
